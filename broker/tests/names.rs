//! Names and sessions over real WebSockets: names unique in a mesh up to confusables, renames,
//! sessions that end (no more broadcasts, the name given up) and leave the roster.

#[macro_use]
mod common;

use std::time::Duration;

use common::*;
use mesh_broker::BrokerConfig;
use mesh_proto::wire::{
    ClientFrame, EndSessionRequest, ErrorCode, GroupRequest, Intent, RenameRequest, RosterRequest, ServerFrame,
};
use mesh_proto::{Identity, MeshId, now_ms};

on_both_stores!(
    a_name_that_is_taken_or_looks_like_one_is_refused_and_costs_no_invite_use,
    a_rename_is_checked_and_the_mesh_sees_the_new_name,
    a_session_that_ended_gets_no_broadcasts_keeps_its_dms_and_gives_its_name_up,
    sessions_unseen_too_long_end_and_ended_ones_leave_the_roster_after_the_grace,
    reconnecting_with_ones_own_name_is_never_refused_and_changing_it_is_a_claim,
);

fn expect_error(frame: ServerFrame, code: ErrorCode) -> mesh_proto::wire::ErrorFrame {
    match frame {
        ServerFrame::Error(e) if e.code == code => e,
        other => panic!("expected error {code:?}, got {other:?}"),
    }
}

/// Connects session `session` of member `member` under `name`.
async fn session(broker: &TestBroker, member: &Identity, session: &Identity, mesh: MeshId, name: &str) -> Client {
    match session_hello_answer(broker, member, session, mesh, name).await {
        (c, ServerFrame::Welcome(_)) => c,
        (_, other) => panic!("session {name} refused: {other:?}"),
    }
}

/// The next presence frame about `key`.
async fn presence_of(c: &mut Client, key: &Identity) -> mesh_proto::wire::Presence {
    presence_where(c, key, |_| true).await
}

/// The next presence frame about `key` that satisfies `want` (failing the test after [`WAIT`]).
async fn presence_where(
    c: &mut Client,
    key: &Identity,
    want: impl Fn(&mesh_proto::wire::Presence) -> bool,
) -> mesh_proto::wire::Presence {
    loop {
        if let ServerFrame::Presence(p) = c.recv().await
            && p.peer.key == key.key()
            && want(&p)
        {
            return p;
        }
    }
}

async fn roster(c: &mut Client, id: u64) -> Vec<mesh_proto::wire::Peer> {
    c.send(&ClientFrame::Roster(RosterRequest { id, after: None })).await;
    loop {
        if let ServerFrame::Roster(r) = c.recv().await {
            return r.peers;
        }
    }
}

async fn a_name_that_is_taken_or_looks_like_one_is_refused_and_costs_no_invite_use(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let a = Identity::generate();
    let mesh = MeshId::generate();
    let mut ca = Client::connect(&broker).await;
    assert!(matches!(ca.hello(&a, mesh, "alice", create_intent("team")).await, ServerFrame::Welcome(_)));
    let single_use = mint_invite(&a, mesh, &broker.url(), now_ms() + 60_000, Some(1));
    let b = Identity::generate();
    for (name, code) in [
        ("alice", ErrorCode::NameTaken),
        ("Alice", ErrorCode::NameTaken),
        ("\u{0430}lice", ErrorCode::NameTaken),   // Cyrillic а
        ("\u{13AA}LICE", ErrorCode::InvalidName), // Cherokee Ꭺ: a script in limited use
        ("aIice", ErrorCode::NameTaken),          // a capital i for the l
        ("ALlCE", ErrorCode::NameTaken),          // a lower-case l for the I of ALICE
        ("\u{1D00}\u{029F}\u{026A}\u{1D04}\u{1D07}", ErrorCode::InvalidName), // small capitals ᴀʟɪᴄᴇ
        ("alice  x", ErrorCode::InvalidName),     // a run of spaces
        ("al\u{200B}ice", ErrorCode::InvalidName), // zero-width space
        ("\u{202E}ecila", ErrorCode::InvalidName), // right-to-left override
        ("alice\u{0301}", ErrorCode::InvalidName), // not NFC
    ] {
        let mut cb = Client::connect(&broker).await;
        let intent = join_intent(&single_use, &cb.challenge.clone(), &b);
        let err = expect_error(cb.hello(&b, mesh, name, intent).await, code);
        assert!(err.permanent, "{name:?}");
        if code == ErrorCode::NameTaken {
            assert!(err.message.contains("member alice"), "says who holds it: {}", err.message);
        }
    }
    // None of the refusals used the single use up.
    let mut cb = Client::connect(&broker).await;
    let intent = join_intent(&single_use, &cb.challenge.clone(), &b);
    assert!(matches!(cb.hello(&b, mesh, "bob", intent).await, ServerFrame::Welcome(_)));
    broker.stop().await;
}

async fn a_rename_is_checked_and_the_mesh_sees_the_new_name(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let TwoMembers { mesh, a, b, mut ca, mut cb } = two_members(&broker).await;
    cb.send(&ClientFrame::Rename(RenameRequest { id: 1, name: "ALICE".into() })).await;
    let err = expect_error(cb.recv_non_presence().await, ErrorCode::NameTaken);
    assert_eq!(err.id, Some(1));
    cb.send(&ClientFrame::Rename(RenameRequest { id: 2, name: "bad\u{2066}name".into() })).await;
    assert_eq!(expect_error(cb.recv_non_presence().await, ErrorCode::InvalidName).id, Some(2));
    // Capitals of another script that lower-case to letters unlike any Latin one.
    cb.send(&ClientFrame::Rename(RenameRequest { id: 7, name: "\u{0391}LICE".into() })).await;
    assert_eq!(expect_error(cb.recv_non_presence().await, ErrorCode::NameTaken).id, Some(7));
    cb.send(&ClientFrame::Rename(RenameRequest { id: 8, name: "\u{0412}ob".into() })).await;
    assert!(matches!(cb.recv_non_presence().await, ServerFrame::Ok(ok) if ok.id == 8), "bob may look like bob");
    ca.send(&ClientFrame::Rename(RenameRequest { id: 9, name: "BOB".into() })).await;
    assert_eq!(expect_error(ca.recv_non_presence().await, ErrorCode::NameTaken).id, Some(9), "BOB looks like Вob");
    cb.send(&ClientFrame::Rename(RenameRequest { id: 3, name: "robert".into() })).await;
    assert!(matches!(cb.recv_non_presence().await, ServerFrame::Ok(ok) if ok.id == 3));
    presence_where(&mut ca, &b, |p| p.peer.name == "robert").await;
    let peers = roster(&mut ca, 4).await;
    assert_eq!(peers.iter().find(|p| p.key == b.key()).expect("bob").name, "robert");
    // Messages from the renamed connection carry the new name.
    cb.send(&ClientFrame::Send(dm(&b, mesh, &a, 5, "c-5", "hi"))).await;
    let from = loop {
        if let ServerFrame::Deliver(d) = ca.recv().await
            && let mesh_proto::wire::DeliveryItem::Message(env) = d.item
        {
            break env.from_name;
        }
    };
    assert_eq!(from, "robert");
    // The old name is free again.
    ca.send(&ClientFrame::Rename(RenameRequest { id: 6, name: "bob".into() })).await;
    assert!(matches!(ca.recv_non_presence().await, ServerFrame::Ok(ok) if ok.id == 6));
    broker.stop().await;
}

async fn a_session_that_ended_gets_no_broadcasts_keeps_its_dms_and_gives_its_name_up(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let TwoMembers { mesh, a, b, mut ca, mut cb } = two_members(&broker).await;
    let worker = Identity::generate();
    // A live session is a recipient of a broadcast (and joins groups like anyone).
    let mut ws = session(&broker, &a, &worker, mesh, "worker").await;
    ws.send(&ClientFrame::JoinGroup(GroupRequest { id: 1, group: "ops".into() })).await;
    assert!(matches!(ws.recv_non_presence().await, ServerFrame::Ok(_)));
    // Connecting, its presence carried its groups (none); joining one, the new list.
    let joined = presence_where(&mut cb, &worker, |p| p.peer.groups.as_ref().is_some_and(|g| !g.is_empty())).await;
    assert_eq!(joined.peer.groups, Some(vec!["ops".to_owned()]));
    cb.send(&ClientFrame::Send(broadcast(&b, mesh, 1, "all-1", "hello all"))).await;
    assert!(matches!(cb.recv_non_presence().await, ServerFrame::Accepted(x) if x.recipients == 2));
    drop(ws);
    // Its connection is gone (the broker has seen it close) before it is ended.
    presence_where(&mut cb, &worker, |p| !p.peer.online).await;

    // Only its member may end it.
    cb.send(&ClientFrame::EndSession(EndSessionRequest { id: 2, key: worker.key() })).await;
    expect_error(cb.recv_non_presence().await, ErrorCode::Forbidden);
    ca.send(&ClientFrame::EndSession(EndSessionRequest { id: 3, key: worker.key() })).await;
    loop {
        match ca.recv().await {
            ServerFrame::Ok(ok) if ok.id == 3 => break,
            ServerFrame::Error(e) => panic!("{e:?}"),
            _ => {}
        }
    }
    let ended = presence_where(&mut cb, &worker, |p| p.peer.ended_at.is_some()).await;
    assert!(!ended.removed && !ended.peer.online);

    // Ended: out of broadcasts and groups, but still in the roster and reachable by DM.
    cb.send(&ClientFrame::Send(broadcast(&b, mesh, 4, "all-2", "hello again"))).await;
    assert!(matches!(cb.recv_non_presence().await, ServerFrame::Accepted(x) if x.recipients == 1));
    let peers = roster(&mut cb, 5).await;
    assert!(peers.iter().find(|p| p.key == worker.key()).expect("still listed").ended_at.is_some());
    cb.send(&ClientFrame::Send(dm(&b, mesh, &worker, 6, "dm-6", "for your next launch"))).await;
    assert!(matches!(cb.recv_non_presence().await, ServerFrame::Accepted(x) if x.recipients == 1));

    // Another member's session takes the name: the ended one leaves the roster at once.
    let other = Identity::generate();
    let _co = session(&broker, &b, &other, mesh, "worker").await;
    let gone = presence_where(&mut ca, &worker, |p| p.removed).await;
    assert!(gone.peer.ended_at.is_some(), "{gone:?}");
    let peers = roster(&mut ca, 7).await;
    assert!(!peers.iter().any(|p| p.key == worker.key()));
    assert_eq!(peers.iter().filter(|p| p.name == "worker").count(), 1);
    broker.stop().await;
}

async fn sessions_unseen_too_long_end_and_ended_ones_leave_the_roster_after_the_grace(backend: Backend) {
    let config = BrokerConfig {
        janitor_interval: Duration::from_millis(50),
        session_stale: Duration::from_millis(200),
        session_grace: Duration::from_millis(200),
        ..BrokerConfig::default()
    };
    let broker = TestBroker::start_on(&backend, config).await;
    let TwoMembers { mesh, a, mut cb, .. } = two_members(&broker).await;
    let worker = Identity::generate();
    let cw = session(&broker, &a, &worker, mesh, "worker").await;
    // Connected, it is never ended, however long it stays.
    let online = presence_of(&mut cb, &worker).await;
    assert!(online.peer.online);
    drop(cw);
    // Gone without its daemon saying so: offline, then ended after the stale period, then removed.
    let mut seen = Vec::new();
    loop {
        let p = presence_of(&mut cb, &worker).await;
        seen.push((p.peer.online, p.peer.ended_at.is_some(), p.removed));
        if p.removed {
            break;
        }
    }
    assert_eq!(seen, [(false, false, false), (false, true, false), (false, true, true)], "{seen:?}");
    let peers = roster(&mut cb, 1).await;
    assert!(!peers.iter().any(|p| p.key == worker.key()));
    broker.stop().await;
}

async fn reconnecting_with_ones_own_name_is_never_refused_and_changing_it_is_a_claim(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let TwoMembers { mesh, a, b, .. } = two_members(&broker).await;
    let mut again = Client::connect(&broker).await;
    assert!(matches!(again.hello(&b, mesh, "bob", Intent::Connect).await, ServerFrame::Welcome(_)));
    let mut other = Client::connect(&broker).await;
    assert!(matches!(other.hello(&a, mesh, "alice", Intent::Connect).await, ServerFrame::Welcome(_)));
    // Changing it on connect is a claim like any other.
    let mut taken = Client::connect(&broker).await;
    expect_error(taken.hello(&b, mesh, "alice", Intent::Connect).await, ErrorCode::NameTaken);
    broker.stop().await;
}
