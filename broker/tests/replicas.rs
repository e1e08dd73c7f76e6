//! Two broker replicas on one PostgreSQL database: what a member connected to one sees of a member
//! connected to the other. Each frame is awaited for at most `WAIT` (10 s), a third of the replicas'
//! safety poll: what arrives came through `LISTEN/NOTIFY`, not through the poll.

#[macro_use]
mod common;

use common::*;
use mesh_broker::BrokerConfig;
use mesh_proto::wire::{Ack, ClientFrame, DeliveryItem, ErrorCode, Intent, ReceiptKind, ServerFrame};
use mesh_proto::{Identity, MeshId, now_ms};

/// Two replicas on a fresh database, and the database's address; `None` without PostgreSQL (said).
async fn replicas(config: BrokerConfig) -> Option<(TestBroker, TestBroker, String)> {
    let backend = Backend::postgres()?;
    let a = TestBroker::start_on(&backend, config.clone()).await;
    let b = TestBroker::start_on(&backend, config).await;
    let Backend::Postgres(url) = backend else { unreachable!("a PostgreSQL backend") };
    Some((a, b, url))
}

/// Waits for `c` to be told that `key` is online (other frames before it are passed over).
async fn told_online(c: &mut Client, key: mesh_proto::PublicKey) {
    match c.recv().await {
        ServerFrame::Presence(p) => assert!(p.peer.online && p.peer.key == key, "{p:?}"),
        other => panic!("expected a presence, got {other:?}"),
    }
}

/// Waits for `c` to be told that `key` went offline (other frames before it are passed over).
async fn told_offline(c: &mut Client, key: mesh_proto::PublicKey) {
    loop {
        if let ServerFrame::Presence(p) = c.recv().await
            && p.peer.key == key
            && !p.peer.online
        {
            return;
        }
    }
}

/// Alice on replica `a` (she creates the mesh), bob on replica `b`.
async fn across(a: &TestBroker, b: &TestBroker) -> TwoMembers {
    let (alice, bob) = (Identity::generate(), Identity::generate());
    let mesh = MeshId::generate();
    let mut ca = Client::connect(a).await;
    assert!(matches!(ca.hello(&alice, mesh, "alice", create_intent("team")).await, ServerFrame::Welcome(_)));
    let token = mint_invite(&alice, mesh, &a.url(), now_ms() + 60_000, None);
    let mut cb = Client::connect(b).await;
    let intent = join_intent(&token, &cb.challenge.clone(), &bob);
    assert!(matches!(cb.hello(&bob, mesh, "bob", intent).await, ServerFrame::Welcome(_)));
    TwoMembers { mesh, a: alice, b: bob, ca, cb }
}

/// Waits for `c`'s `superseded` error (other frames before it are passed over).
async fn superseded(c: &mut Client) {
    loop {
        match c.try_recv().await {
            Some(ServerFrame::Error(e)) => {
                assert_eq!(e.code, ErrorCode::Superseded);
                return;
            }
            Some(_) => continue,
            None => panic!("closed without a superseded error"),
        }
    }
}

async fn next_deliver(c: &mut Client) -> mesh_proto::wire::Deliver {
    match c.recv_non_presence().await {
        ServerFrame::Deliver(d) => d,
        other => panic!("expected a delivery, got {other:?}"),
    }
}

#[tokio::test]
async fn a_message_sent_on_one_replica_is_pushed_by_the_other_and_receipted_back() {
    let Some((ra, rb, _)) = replicas(BrokerConfig::default()).await else { return };
    let mut t = across(&ra, &rb).await;
    for i in 0..3 {
        t.ca.send(&ClientFrame::Send(dm(&t.a, t.mesh, &t.b, i, &format!("c-{i}"), &format!("hi {i}")))).await;
        let ServerFrame::Accepted(accepted) = t.ca.recv_non_presence().await else { panic!("not accepted") };
        // Bob is idle on the other replica: the wake-up crosses over.
        let d = next_deliver(&mut t.cb).await;
        let DeliveryItem::Message(env) = &d.item else { panic!("expected a message") };
        assert_eq!(env.message_id, accepted.message_id);
        t.cb.send(&ClientFrame::Ack(Ack { delivery_ids: vec![d.delivery_id] })).await;
        let receipt = next_deliver(&mut t.ca).await;
        let DeliveryItem::Receipt(r) = &receipt.item else { panic!("expected a receipt, got {receipt:?}") };
        assert_eq!(
            (r.kind, r.recipient, r.client_message_id.as_str()),
            (ReceiptKind::Delivered, t.b.key(), &*format!("c-{i}"))
        );
        t.ca.send(&ClientFrame::Ack(Ack { delivery_ids: vec![receipt.delivery_id] })).await;
    }
    // A broadcast from bob reaches alice on the first replica.
    t.cb.send(&ClientFrame::Send(broadcast(&t.b, t.mesh, 9, "b-1", "all of you"))).await;
    assert!(matches!(t.cb.recv_non_presence().await, ServerFrame::Accepted(_)));
    assert!(matches!(next_deliver(&mut t.ca).await.item, DeliveryItem::Message(_)));
    ra.stop().await;
    rb.stop().await;
}

#[tokio::test]
async fn presence_rosters_and_supersede_cross_replicas() {
    let Some((ra, rb, _)) = replicas(BrokerConfig::default()).await else { return };
    let mut t = across(&ra, &rb).await;
    // Alice, on the first replica, hears bob come online on the second.
    told_online(&mut t.ca, t.b.key()).await;
    // A third member joining on the first replica sees bob online in its welcome's roster.
    let carol = Identity::generate();
    let token = mint_invite(&t.a, t.mesh, &ra.url(), now_ms() + 60_000, None);
    let mut cc = Client::connect(&ra).await;
    let intent = join_intent(&token, &cc.challenge.clone(), &carol);
    let ServerFrame::Welcome(welcome) = cc.hello(&carol, t.mesh, "carol", intent).await else { panic!("welcome") };
    let bob = welcome.roster.iter().find(|p| p.key == t.b.key()).expect("bob in the roster");
    assert!(bob.online, "bob is online on the other replica");
    // Bob connecting again on the first replica supersedes his connection on the second.
    let mut again = Client::connect(&ra).await;
    assert!(matches!(again.hello(&t.b, t.mesh, "bob", Intent::Connect).await, ServerFrame::Welcome(_)));
    superseded(&mut t.cb).await;
    assert!(t.cb.try_recv().await.is_none(), "the old connection is closed");
    // Its leaving is no news: bob is connected. Alice hears no offline for him before his next
    // message, sent after the old connection closed.
    again.send(&ClientFrame::Send(dm(&t.b, t.mesh, &t.a, 7, "after-supersede", "still here"))).await;
    loop {
        match t.ca.recv().await {
            ServerFrame::Presence(p) if p.peer.key == t.b.key() => {
                assert!(p.peer.online, "bob announced offline while connected: {p:?}")
            }
            ServerFrame::Deliver(_) => break,
            _ => continue,
        }
    }
    // Bob leaves altogether: alice hears him go offline.
    drop(again);
    told_offline(&mut t.ca, t.b.key()).await;
    ra.stop().await;
    rb.stop().await;
}

#[tokio::test]
async fn a_recipient_whose_replica_stops_gets_its_unacked_items_from_another_at_once() {
    // Leases far longer than the test waits: only the goodbye can free them in time.
    let config = BrokerConfig { lease: std::time::Duration::from_secs(600), ..BrokerConfig::default() };
    let Some((ra, rb, _)) = replicas(config).await else { return };
    let mut t = across(&ra, &rb).await;
    t.ca.send(&ClientFrame::Send(dm(&t.a, t.mesh, &t.b, 1, "c-1", "unacked"))).await;
    let first = next_deliver(&mut t.cb).await;
    // Bob never acks; his replica stops, and he comes back through the other one.
    drop(t.cb);
    rb.stop().await;
    let mut again = Client::connect(&ra).await;
    assert!(matches!(again.hello(&t.b, t.mesh, "bob", Intent::Connect).await, ServerFrame::Welcome(_)));
    let redelivered = next_deliver(&mut again).await;
    assert_eq!(redelivered.delivery_id, first.delivery_id, "the same item, once more");
    ra.stop().await;
}

#[tokio::test]
async fn members_of_a_replica_that_stops_are_seen_leaving_by_the_others() {
    let Some((ra, rb, _)) = replicas(BrokerConfig::default()).await else { return };
    let mut t = across(&ra, &rb).await;
    told_online(&mut t.ca, t.b.key()).await;
    // Bob's replica shuts down (SIGTERM's path): alice, on the other, hears him go.
    rb.stop().await;
    loop {
        if let ServerFrame::Presence(p) = t.ca.recv().await
            && p.peer.key == t.b.key()
        {
            assert!(!p.peer.online, "{p:?}");
            break;
        }
    }
    ra.stop().await;
}

/// A replica taken for dead (paused past its heartbeat timeout) while its member moved to another
/// replica: when it comes back, the member's live connection on the other replica is kept, and the
/// connection left behind on this one is closed as superseded.
#[tokio::test]
async fn a_replica_back_from_the_dead_leaves_connections_that_moved_alone() {
    let Some((ra, rb, url)) = replicas(BrokerConfig::default()).await else { return };
    let mut t = across(&ra, &rb).await;
    // The first replica is buried as another replica buries one silent for 15 s: its row and its
    // connections go, while alice's connection to it still looks alive to it.
    let (db, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    db.execute(
        "WITH dead AS (DELETE FROM replicas WHERE id = (SELECT replica FROM connections WHERE mesh_id = $1 AND key = $2)
                       RETURNING id)
         DELETE FROM connections WHERE replica IN (SELECT id FROM dead)",
        &[&t.mesh.to_string(), &t.a.key().to_string()],
    )
    .await
    .expect("taken for dead");
    // Alice's daemon moves to the second replica.
    let mut moved = Client::connect(&rb).await;
    assert!(matches!(moved.hello(&t.a, t.mesh, "alice", Intent::Connect).await, ServerFrame::Welcome(_)));
    // The first replica's next heartbeat finds it was taken for dead: the connection it kept for
    // alice is the stale one.
    superseded(&mut t.ca).await;
    // The live one still carries messages.
    t.cb.send(&ClientFrame::Send(dm(&t.b, t.mesh, &t.a, 1, "after-return", "still here"))).await;
    assert!(matches!(t.cb.recv_non_presence().await, ServerFrame::Accepted(_)));
    assert!(matches!(next_deliver(&mut moved).await.item, DeliveryItem::Message(_)));
    ra.stop().await;
    rb.stop().await;
}

/// A replica that stopped listening to the others for a while (its listening connection lost, and
/// the database refusing new connections meanwhile) missed their presence frames: once it listens
/// again, its connections are told the mesh's current presence.
#[tokio::test]
async fn presence_missed_while_not_listening_is_told_once_listening_again() {
    let Some((ra, rb, url)) = replicas(BrokerConfig::default()).await else { return };
    let mut t = across(&ra, &rb).await;
    told_online(&mut t.ca, t.b.key()).await;
    // From another database: a database cannot refuse connections from its own session.
    let mut admin: tokio_postgres::Config = url.parse().expect("the test's address");
    let name = admin.get_dbname().expect("a database").to_owned();
    let (db, connection) = admin.dbname("postgres").connect(tokio_postgres::NoTls).await.expect("connect");
    tokio::spawn(connection);
    // No replica can listen again until connections are allowed: the pools keep theirs.
    db.batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS false")).await.expect("refuse");
    db.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1 AND query LIKE 'LISTEN%'",
        &[&name],
    )
    .await
    .expect("listeners cut");
    // Bob leaves meanwhile: the first replica is not listening.
    drop(t.cb);
    db.batch_execute(&format!("ALTER DATABASE \"{name}\" ALLOW_CONNECTIONS true")).await.expect("allow");
    told_offline(&mut t.ca, t.b.key()).await;
    ra.stop().await;
    rb.stop().await;
}

#[tokio::test]
async fn a_member_removed_on_one_replica_is_cut_off_on_the_other_at_once() {
    use mesh_proto::membership::{ChangeKind, MembershipAction};
    let Some((ra, rb, _)) = replicas(BrokerConfig::default()).await else { return };
    let mut t = across(&ra, &rb).await;
    told_online(&mut t.ca, t.b.key()).await;
    let action = mesh_proto::signed::Signed::sign(
        &t.a,
        &MembershipAction {
            v: 1,
            mesh_id: t.mesh,
            kind: ChangeKind::Remove,
            target: t.b.key(),
            role: None,
            by: t.a.key(),
            at: now_ms(),
        },
    );
    t.ca.send(&ClientFrame::Membership(mesh_proto::wire::MembershipRequest { id: 1, action })).await;
    // Bob's connection, on the other replica, is ended with the reason within the frame wait.
    let code = loop {
        match t.cb.try_recv().await {
            Some(ServerFrame::Error(e)) => break Some((e.code, e.message)),
            Some(_) => continue,
            None => break None,
        }
    };
    let (code, message) = code.expect("an error before the close");
    assert_eq!(code, ErrorCode::Revoked);
    assert!(message.contains("removed from the mesh by alice"), "{message}");
    // And he is refused on either replica.
    for replica in [&ra, &rb] {
        let mut again = Client::connect(replica).await;
        let answer = again.hello(&t.b, t.mesh, "bob", Intent::Connect).await;
        assert!(matches!(answer, ServerFrame::Error(ref e) if e.code == ErrorCode::Revoked), "{answer:?}");
    }
}
