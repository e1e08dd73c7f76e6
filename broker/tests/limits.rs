//! What one member can take from the others: sessions and connections per member, a mesh's limit
//! that never keeps a member out, and connections that never authenticate.

#[macro_use]
mod common;

use common::*;
use mesh_broker::BrokerConfig;
use mesh_proto::Identity;
use mesh_proto::wire::{ClientFrame, ErrorCode, Intent, MeshLimits, ServerFrame, SetLimitsRequest};

on_both_stores!(
    one_member_s_sessions_never_lock_the_other_members_out,
    one_member_s_connections_are_bounded,
    the_roster_comes_in_pages_so_a_welcome_does_not_grow_with_the_mesh,
    owners_and_admins_set_a_mesh_s_limits_within_the_broker_s,
    sessions_started_and_ended_in_a_loop_cannot_grow_the_roster,
);

async fn one_member_s_sessions_never_lock_the_other_members_out(backend: Backend) {
    let config = BrokerConfig { max_sessions_per_member: 3, max_connections_per_mesh: 4, ..BrokerConfig::default() };
    let broker = TestBroker::start_on(&backend, config).await;
    let TwoMembers { mesh, a, b, ca, cb } = two_members(&broker).await;
    drop(cb);
    // Member a fills its sessions; the next one is refused, typed and transient.
    let mut ca = ca;
    let mut held = vec![];
    for i in 0..3 {
        let session = Identity::generate();
        let (c, answer) = session_hello_answer(&broker, &a, &session, mesh, &format!("s{i}")).await;
        assert!(matches!(answer, ServerFrame::Welcome(_)), "session {i}: {answer:?}");
        registered(&mut ca, &session).await;
        held.push(c);
    }
    let (_, answer) = session_hello_answer(&broker, &a, &Identity::generate(), mesh, "s3").await;
    assert_eq!(code_of(&answer), Some(ErrorCode::TooManySessions), "{answer:?}");
    let ServerFrame::Error(e) = &answer else { unreachable!() };
    assert!(!e.permanent, "it clears when sessions end");

    // The mesh is at its limit (a and its 3 sessions), yet member b gets in...
    let mut again = Client::connect(&broker).await;
    assert!(matches!(again.hello(&b, mesh, "bob", Intent::Connect).await, ServerFrame::Welcome(_)));
    // ...while a session of b's waits for room.
    let (_, answer) = session_hello_answer(&broker, &b, &Identity::generate(), mesh, "b1").await;
    assert_eq!(code_of(&answer), Some(ErrorCode::TooManyConnections), "{answer:?}");
    broker.stop().await;
}

async fn one_member_s_connections_are_bounded(backend: Backend) {
    let config = BrokerConfig { max_connections_per_member: 2, ..BrokerConfig::default() };
    let broker = TestBroker::start_on(&backend, config).await;
    let TwoMembers { mesh, a, mut ca, .. } = two_members(&broker).await;
    let s1 = Identity::generate();
    let (c1, answer) = session_hello_answer(&broker, &a, &s1, mesh, "s1").await;
    assert!(matches!(answer, ServerFrame::Welcome(_)), "{answer:?}");
    registered(&mut ca, &s1).await;
    let (_, answer) = session_hello_answer(&broker, &a, &Identity::generate(), mesh, "s2").await;
    assert_eq!(code_of(&answer), Some(ErrorCode::TooManyConnections), "{answer:?}");
    drop((ca, c1));
    broker.stop().await;
}

async fn the_roster_comes_in_pages_so_a_welcome_does_not_grow_with_the_mesh(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig { roster_page: 2, ..BrokerConfig::default() }).await;
    let TwoMembers { mesh, a, .. } = two_members(&broker).await;
    let mut held = vec![];
    for i in 0..3 {
        let (c, answer) = session_hello_answer(&broker, &a, &Identity::generate(), mesh, &format!("s{i}")).await;
        assert!(matches!(answer, ServerFrame::Welcome(_)));
        held.push(c);
    }
    let mut c = Client::connect(&broker).await;
    let ServerFrame::Welcome(w) = c.hello(&a, mesh, "alice", Intent::Connect).await else { panic!("welcome") };
    assert_eq!(w.roster.len(), 2);
    let mut keys: Vec<_> = w.roster.iter().map(|p| p.key).collect();
    let mut next = w.roster_next;
    let mut id = 1;
    while let Some(after) = next {
        c.send(&mesh_proto::wire::ClientFrame::Roster(mesh_proto::wire::RosterRequest { id, after: Some(after) }))
            .await;
        let page = loop {
            if let ServerFrame::Roster(r) = c.recv().await {
                break r;
            }
        };
        assert!(page.peers.len() <= 2);
        keys.extend(page.peers.iter().map(|p| p.key));
        next = page.next;
        id += 1;
    }
    let mut sorted = keys.clone();
    sorted.sort();
    sorted.dedup();
    assert_eq!((keys.len(), sorted), (5, keys.clone()), "every peer once, in key order");
    broker.stop().await;
}

/// Sends `frame` on `c` and returns the answer to request `id` (`ok` or an error), skipping presence.
async fn answer_to(c: &mut Client, frame: ClientFrame, id: u64) -> ServerFrame {
    c.send(&frame).await;
    loop {
        match c.recv().await {
            ServerFrame::Ok(ok) if ok.id == id => return ServerFrame::Ok(ok),
            ServerFrame::Error(e) if e.id == Some(id) => return ServerFrame::Error(e),
            _ => {}
        }
    }
}

async fn owners_and_admins_set_a_mesh_s_limits_within_the_broker_s(backend: Backend) {
    let config = BrokerConfig { max_sessions_per_member: 10, ..BrokerConfig::default() };
    let broker = TestBroker::start_on(&backend, config).await;
    let TwoMembers { mesh, a, b, mut ca, mut cb } = two_members(&broker).await;
    let set = |id, sessions: Option<u32>, reset| {
        ClientFrame::SetLimits(SetLimitsRequest { id, reset, sessions_per_member: sessions, ..Default::default() })
    };

    // A plain member, and a session even of the owner, may not.
    let answer = answer_to(&mut cb, set(1, Some(1), false), 1).await;
    assert_eq!(code_of(&answer), Some(ErrorCode::Forbidden), "{answer:?}");
    let owner_session = Identity::generate();
    let (mut cs, answer) = session_hello_answer(&broker, &a, &owner_session, mesh, "s0").await;
    assert!(matches!(answer, ServerFrame::Welcome(_)), "{answer:?}");
    let answer = answer_to(&mut cs, set(1, Some(1), false), 1).await;
    assert_eq!(code_of(&answer), Some(ErrorCode::Forbidden), "{answer:?}");

    // Outside 1..=the broker's value is refused, typed and permanent.
    for bad in [0, 11] {
        let answer = answer_to(&mut ca, set(2, Some(bad), false), 2).await;
        assert_eq!(code_of(&answer), Some(ErrorCode::LimitOutOfRange), "{bad}: {answer:?}");
        let ServerFrame::Error(e) = &answer else { unreachable!() };
        assert!(e.permanent && e.message.contains("1 to 10"), "{e:?}");
    }

    // The owner lowers it to 2: the member's third live session is refused; welcome says so.
    assert!(matches!(answer_to(&mut ca, set(3, Some(2), false), 3).await, ServerFrame::Ok(_)));
    let (_c1, answer) = session_hello_answer(&broker, &b, &Identity::generate(), mesh, "b1").await;
    let ServerFrame::Welcome(w) = answer else { panic!("{answer:?}") };
    assert_eq!((w.limits.mesh.sessions_per_member, w.limits.broker.sessions_per_member), (2, 10));
    let (_c2, answer) = session_hello_answer(&broker, &b, &Identity::generate(), mesh, "b2").await;
    assert!(matches!(answer, ServerFrame::Welcome(_)), "{answer:?}");
    let (_, answer) = session_hello_answer(&broker, &b, &Identity::generate(), mesh, "b3").await;
    assert_eq!(code_of(&answer), Some(ErrorCode::TooManySessions), "{answer:?}");
    let ServerFrame::Error(e) = &answer else { unreachable!() };
    assert!(e.message.contains("already has 2 live sessions"), "{e:?}");

    // A reset gives the broker's value back, and the settings survive a restart of the broker.
    assert!(matches!(answer_to(&mut ca, set(4, None, true), 4).await, ServerFrame::Ok(_)));
    let (_c3, answer) = session_hello_answer(&broker, &b, &Identity::generate(), mesh, "b3").await;
    assert!(matches!(answer, ServerFrame::Welcome(_)), "{answer:?}");
    let connections = ClientFrame::SetLimits(SetLimitsRequest { id: 5, connections: Some(7), ..Default::default() });
    assert!(matches!(answer_to(&mut ca, connections, 5).await, ServerFrame::Ok(_)));
    drop((ca, cb, cs));
    let broker = broker.restart().await;
    let mut c = Client::connect(&broker).await;
    let ServerFrame::Welcome(w) = c.hello(&a, mesh, "alice", Intent::Connect).await else { panic!("welcome") };
    assert_eq!(w.limits.mesh, MeshLimits { sessions_per_member: 10, connections: 7, ..w.limits.broker });
    broker.stop().await;
}

async fn sessions_started_and_ended_in_a_loop_cannot_grow_the_roster(backend: Backend) {
    let config = BrokerConfig { max_sessions_per_member: 3, ..BrokerConfig::default() };
    let broker = TestBroker::start_on(&backend, config).await;
    let TwoMembers { mesh, b, mut cb, .. } = two_members(&broker).await;
    for i in 0..10u64 {
        let session = Identity::generate();
        let (c, answer) = session_hello_answer(&broker, &b, &session, mesh, &format!("s{i}")).await;
        assert!(matches!(answer, ServerFrame::Welcome(_)), "session {i}: {answer:?}");
        drop(c);
        let end = ClientFrame::EndSession(mesh_proto::wire::EndSessionRequest { id: 100 + i, key: session.key() });
        assert!(matches!(answer_to(&mut cb, end, 100 + i).await, ServerFrame::Ok(_)), "end {i}");
    }
    let roster = ClientFrame::Roster(mesh_proto::wire::RosterRequest { id: 1, after: None });
    cb.send(&roster).await;
    let peers = loop {
        if let ServerFrame::Roster(r) = cb.recv().await {
            break r.peers;
        }
    };
    let ended: Vec<_> = peers.iter().filter(|p| p.ended_at.is_some()).map(|p| p.name.as_str()).collect();
    assert_eq!((peers.len(), ended.len()), (2 + 3, 3), "two members and three ended sessions: {ended:?}");
    broker.stop().await;
}
