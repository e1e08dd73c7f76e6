//! The broker end to end over real WebSockets on loopback: handshake, store-and-forward, acks,
//! receipts, idempotency and typed errors for bad input.

#[macro_use]
mod common;

use common::*;
use futures_util::SinkExt;
use mesh_broker::BrokerConfig;
use mesh_proto::attestation::SessionAttestation;
use mesh_proto::message;
use mesh_proto::wire::{Ack, ClientFrame, DeliveryItem, ErrorCode, HelloClaims, Intent, ReceiptKind, ServerFrame};
use mesh_proto::{Identity, MeshId, now_ms};

on_both_stores!(
    direct_message_is_delivered_acked_and_receipted,
    offline_recipient_gets_queued_messages_on_connect_in_order,
    unacked_delivery_is_sent_again_when_its_lease_runs_out,
    sends_are_idempotent_on_client_message_id,
    unknown_recipient_is_a_permanent_error,
    hello_with_a_bad_signature_is_refused,
    replayed_hello_is_refused_on_a_new_connection,
    unknown_member_and_unknown_mesh_are_refused,
    expired_invite_is_refused,
    single_use_invite_cannot_be_used_twice_but_a_retry_by_the_joiner_is_fine,
    join_without_proof_of_the_token_secret_is_refused,
    invite_from_a_plain_member_is_refused,
    create_token_is_enforced_when_configured,
    frames_before_hello_get_not_authenticated,
    malformed_and_unknown_frames_get_typed_errors_and_the_connection_survives,
    a_frame_over_the_hard_cap_gets_a_typed_error_before_close,
    presence_and_supersede,
    rate_limit_is_typed_transient_and_never_refuses_a_duplicate,
    a_delivery_leased_by_a_superseded_connection_goes_to_the_new_one_at_once,
    read_receipts_reach_the_sender_once_and_only_from_an_addressee,
    group_messages_reach_current_members_only,
    a_burst_of_frames_is_answered_in_order_each_send_on_its_own,
    a_connection_that_never_says_hello_is_closed_with_handshake_timeout,
    session_attestations_that_are_forged_expired_or_for_another_key_are_refused,
    messages_acked_in_one_frame_come_back_as_one_receipts_item,
    a_repeated_ack_never_removes_a_later_item,
);

fn expect_error(frame: ServerFrame, code: ErrorCode) -> mesh_proto::wire::ErrorFrame {
    match frame {
        ServerFrame::Error(e) if e.code == code => e,
        other => panic!("expected error {code:?}, got {other:?}"),
    }
}

async fn direct_message_is_delivered_acked_and_receipted(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let mut t = two_members(&broker).await;
    t.ca.send(&ClientFrame::Send(dm(&t.a, t.mesh, &t.b, 1, "c-1", "hello bob"))).await;
    let accepted = match t.ca.recv_non_presence().await {
        ServerFrame::Accepted(a) => a,
        other => panic!("expected accepted, got {other:?}"),
    };
    assert_eq!((accepted.id, accepted.duplicate, accepted.recipients), (1, false, 1));

    let deliver = match t.cb.recv_non_presence().await {
        ServerFrame::Deliver(d) => d,
        other => panic!("expected deliver, got {other:?}"),
    };
    let DeliveryItem::Message(env) = &deliver.item else { panic!("expected a message") };
    assert_eq!(env.message_id, accepted.message_id);
    assert_eq!(env.from, t.a.key());
    assert_eq!(env.from_name, "alice");
    assert_eq!(message::open(env, &t.b, None).expect("opens").body, "hello bob");

    t.cb.send(&ClientFrame::Ack(Ack { delivery_ids: vec![deliver.delivery_id] })).await;
    match t.ca.recv_non_presence().await {
        ServerFrame::Deliver(d) => match d.item {
            DeliveryItem::Receipt(r) => {
                assert_eq!(
                    (r.kind, r.recipient, r.message_id.as_str()),
                    (ReceiptKind::Delivered, t.b.key(), accepted.message_id.as_str())
                );
                assert_eq!(r.client_message_id, "c-1");
            }
            other => panic!("expected a receipt, got {other:?}"),
        },
        other => panic!("expected deliver, got {other:?}"),
    }
    broker.stop().await;
}

async fn offline_recipient_gets_queued_messages_on_connect_in_order(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let TwoMembers { mesh, a, b, mut ca, cb } = two_members(&broker).await;
    drop(cb);
    for i in 0..5 {
        ca.send(&ClientFrame::Send(dm(&a, mesh, &b, i, &format!("c-{i}"), &format!("msg {i}")))).await;
        assert!(matches!(ca.recv_non_presence().await, ServerFrame::Accepted(_)));
    }
    let mut cb = Client::connect(&broker).await;
    assert!(matches!(cb.hello(&b, mesh, "bob", Intent::Connect).await, ServerFrame::Welcome(_)));
    let mut bodies = vec![];
    while bodies.len() < 5 {
        if let ServerFrame::Deliver(d) = cb.recv_non_presence().await {
            let DeliveryItem::Message(env) = d.item else { panic!("message expected") };
            bodies.push(message::open(&env, &b, None).expect("opens").body);
        }
    }
    assert_eq!(bodies, (0..5).map(|i| format!("msg {i}")).collect::<Vec<_>>());
    broker.stop().await;
}

async fn unacked_delivery_is_sent_again_when_its_lease_runs_out(backend: Backend) {
    let config = BrokerConfig { lease: std::time::Duration::from_millis(300), ..BrokerConfig::default() };
    let broker = TestBroker::start_on(&backend, config).await;
    let mut t = two_members(&broker).await;
    t.ca.send(&ClientFrame::Send(dm(&t.a, t.mesh, &t.b, 1, "c-1", "again"))).await;
    let first = match t.cb.recv_non_presence().await {
        ServerFrame::Deliver(d) => d.delivery_id,
        other => panic!("{other:?}"),
    };
    // No ack and no other traffic: only the lease timer can cause the second delivery.
    let second = match t.cb.recv_non_presence().await {
        ServerFrame::Deliver(d) => d.delivery_id,
        other => panic!("{other:?}"),
    };
    assert_eq!(first, second);
    broker.stop().await;
}

async fn sends_are_idempotent_on_client_message_id(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let mut t = two_members(&broker).await;
    let send = dm(&t.a, t.mesh, &t.b, 1, "same-id", "one");
    t.ca.send(&ClientFrame::Send(send.clone())).await;
    let ServerFrame::Accepted(first) = t.ca.recv_non_presence().await else { panic!("accepted") };
    t.ca.send(&ClientFrame::Send(mesh_proto::wire::SendMessage { id: 2, ..send })).await;
    let ServerFrame::Accepted(again) = t.ca.recv_non_presence().await else { panic!("accepted") };
    assert!(again.duplicate);
    assert_eq!(again.message_id, first.message_id);
    t.ca.send(&ClientFrame::Send(dm(&t.a, t.mesh, &t.b, 3, "same-id", "other content"))).await;
    let err = expect_error(t.ca.recv_non_presence().await, ErrorCode::IdempotencyConflict);
    assert_eq!(err.id, Some(3));
    assert!(err.permanent);
    // Exactly one copy reached the recipient's queue.
    let ServerFrame::Deliver(d) = t.cb.recv_non_presence().await else { panic!("deliver") };
    t.cb.send(&ClientFrame::Ack(Ack { delivery_ids: vec![d.delivery_id] })).await;
    t.cb.send(&ClientFrame::Roster(mesh_proto::wire::RosterRequest { id: 9, after: None })).await;
    assert!(matches!(t.cb.recv_non_presence().await, ServerFrame::Roster(r) if r.id == 9));
    broker.stop().await;
}

async fn unknown_recipient_is_a_permanent_error(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let mut t = two_members(&broker).await;
    let stranger = Identity::generate();
    t.ca.send(&ClientFrame::Send(dm(&t.a, t.mesh, &stranger, 5, "c-x", "hi"))).await;
    let err = expect_error(t.ca.recv_non_presence().await, ErrorCode::RecipientUnknown);
    assert_eq!(err.id, Some(5));
    assert!(err.permanent);
    broker.stop().await;
}

#[tokio::test]
async fn broker_database_holds_no_plaintext() {
    let broker = TestBroker::start(BrokerConfig::default()).await;
    let mut t = two_members(&broker).await;
    let secret = "the-launch-code-is-0000-plaintext-marker";
    t.ca.send(&ClientFrame::Send(dm(&t.a, t.mesh, &t.b, 1, "c-1", secret))).await;
    assert!(matches!(t.ca.recv_non_presence().await, ServerFrame::Accepted(_)));
    let path = broker.db_path.clone();
    let _dir = broker.stop().await;
    let mut bytes = std::fs::read(&path).expect("db");
    bytes.extend(std::fs::read(path.with_extension("db-wal")).unwrap_or_default());
    assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()), "plaintext found in the broker database");
    assert!(!bytes.windows(32).any(|w| w == t.b.sign_seed()), "a private key found in the broker database");
}

// --- handshake refusals -------------------------------------------------------------------------

async fn hello_with_a_bad_signature_is_refused(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let (a, mallory) = (Identity::generate(), Identity::generate());
    let mut c = Client::connect(&broker).await;
    let ClientFrame::Hello(mut hello) = hello_frame(&c.challenge, &a, MeshId::generate(), "alice", create_intent("m"))
    else {
        unreachable!()
    };
    // Same claims, signature by someone else.
    let ClientFrame::Hello(other) = hello_frame(&c.challenge, &mallory, MeshId::generate(), "m", create_intent("m"))
    else {
        unreachable!()
    };
    hello.auth.sig = other.auth.sig;
    c.send(&ClientFrame::Hello(hello)).await;
    let err = expect_error(c.recv().await, ErrorCode::BadSignature);
    assert!(err.permanent);
    assert!(c.try_recv().await.is_none(), "connection closes after a refusal");
    broker.stop().await;
}

async fn replayed_hello_is_refused_on_a_new_connection(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let a = Identity::generate();
    let mesh = MeshId::generate();
    let mut c1 = Client::connect(&broker).await;
    let captured = hello_frame(&c1.challenge, &a, mesh, "alice", create_intent("m"));
    c1.send(&captured).await;
    assert!(matches!(c1.recv().await, ServerFrame::Welcome(_)));
    let mut c2 = Client::connect(&broker).await;
    c2.send(&captured).await;
    expect_error(c2.recv().await, ErrorCode::ChallengeMismatch);
    broker.stop().await;
}

async fn unknown_member_and_unknown_mesh_are_refused(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let t = two_members(&broker).await;
    let mut c = Client::connect(&broker).await;
    expect_error(c.hello(&Identity::generate(), t.mesh, "eve", Intent::Connect).await, ErrorCode::UnknownMember);
    let mut c = Client::connect(&broker).await;
    expect_error(c.hello(&t.a, MeshId::generate(), "alice", Intent::Connect).await, ErrorCode::UnknownMesh);
    broker.stop().await;
}

async fn expired_invite_is_refused(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let t = two_members(&broker).await;
    let token = mint_invite(&t.a, t.mesh, &broker.url(), now_ms() - 1, None);
    let joiner = Identity::generate();
    let mut c = Client::connect(&broker).await;
    let intent = join_intent(&token, &c.challenge.clone(), &joiner);
    expect_error(c.hello(&joiner, t.mesh, "carol", intent).await, ErrorCode::InviteExpired);
    broker.stop().await;
}

async fn single_use_invite_cannot_be_used_twice_but_a_retry_by_the_joiner_is_fine(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let t = two_members(&broker).await;
    let token = mint_invite(&t.a, t.mesh, &broker.url(), now_ms() + 60_000, Some(1));
    let (carol, dave) = (Identity::generate(), Identity::generate());
    let mut c = Client::connect(&broker).await;
    let intent = join_intent(&token, &c.challenge.clone(), &carol);
    assert!(matches!(c.hello(&carol, t.mesh, "carol", intent).await, ServerFrame::Welcome(_)));
    // The joiner retrying (its welcome was lost, say) does not consume or fail.
    let mut c2 = Client::connect(&broker).await;
    let intent = join_intent(&token, &c2.challenge.clone(), &carol);
    assert!(matches!(c2.hello(&carol, t.mesh, "carol", intent).await, ServerFrame::Welcome(_)));
    let mut c3 = Client::connect(&broker).await;
    let intent = join_intent(&token, &c3.challenge.clone(), &dave);
    expect_error(c3.hello(&dave, t.mesh, "dave", intent).await, ErrorCode::InviteExhausted);
    broker.stop().await;
}

async fn join_without_proof_of_the_token_secret_is_refused(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let t = two_members(&broker).await;
    let token = mint_invite(&t.a, t.mesh, &broker.url(), now_ms() + 60_000, None);
    let eve = Identity::generate();
    let mut c = Client::connect(&broker).await;
    // Someone who saw only the signed part cannot sign the challenge with the token's auth key.
    let intent = Intent::Join {
        invite: token.invite.clone(),
        proof: eve.sign("mesh/invite-proof/v1", &[&c.challenge, &eve.key().0]),
    };
    expect_error(c.hello(&eve, t.mesh, "eve", intent).await, ErrorCode::InviteInvalid);
    broker.stop().await;
}

async fn invite_from_a_plain_member_is_refused(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let t = two_members(&broker).await;
    let token = mint_invite(&t.b, t.mesh, &broker.url(), now_ms() + 60_000, None);
    let eve = Identity::generate();
    let mut c = Client::connect(&broker).await;
    let intent = join_intent(&token, &c.challenge.clone(), &eve);
    expect_error(c.hello(&eve, t.mesh, "eve", intent).await, ErrorCode::InviteInvalid);
    broker.stop().await;
}

async fn create_token_is_enforced_when_configured(backend: Backend) {
    let config = BrokerConfig { create_token: Some("s3cret".into()), ..BrokerConfig::default() };
    let broker = TestBroker::start_on(&backend, config).await;
    let a = Identity::generate();
    let mut c = Client::connect(&broker).await;
    expect_error(c.hello(&a, MeshId::generate(), "alice", create_intent("m")).await, ErrorCode::CreateForbidden);
    let mut c = Client::connect(&broker).await;
    let intent = Intent::Create { mesh_name: "m".into(), create_token: Some("s3cret".into()) };
    assert!(matches!(c.hello(&a, MeshId::generate(), "alice", intent).await, ServerFrame::Welcome(_)));
    broker.stop().await;
}

// --- bad frames -----------------------------------------------------------------------------------

async fn frames_before_hello_get_not_authenticated(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let mut c = Client::connect(&broker).await;
    c.send(&ClientFrame::Roster(mesh_proto::wire::RosterRequest { id: 1, after: None })).await;
    expect_error(c.recv().await, ErrorCode::NotAuthenticated);
    assert!(c.try_recv().await.is_none());
    let mut c = Client::connect(&broker).await;
    c.send_text("{not json").await;
    expect_error(c.recv().await, ErrorCode::BadFrame);
    broker.stop().await;
}

async fn malformed_and_unknown_frames_get_typed_errors_and_the_connection_survives(backend: Backend) {
    let config = BrokerConfig { max_frame_bytes: 4096, ..BrokerConfig::default() };
    let broker = TestBroker::start_on(&backend, config).await;
    let mut t = two_members(&broker).await;
    let c = &mut t.ca;
    c.send_text("not json at all").await;
    expect_error(c.recv_non_presence().await, ErrorCode::BadFrame);
    c.send_text(r#"{"type":"teleport","id":7}"#).await;
    assert_eq!(expect_error(c.recv_non_presence().await, ErrorCode::UnknownType).id, Some(7));
    c.send_text(r#"{"type":"send","id":8,"to":"*"}"#).await;
    assert_eq!(expect_error(c.recv_non_presence().await, ErrorCode::BadFrame).id, Some(8));
    c.send_text(
        r#"{"type":"send","id":9,"client_message_id":"x","to":"*","nonce":"AAAA","ciphertext":"AAAA","sig":"AAAA"}"#,
    )
    .await;
    assert_eq!(expect_error(c.recv_non_presence().await, ErrorCode::BadFrame).id, Some(9));
    c.ws.send(tokio_tungstenite::tungstenite::Message::Binary(vec![1, 2, 3].into())).await.expect("send binary");
    expect_error(c.recv_non_presence().await, ErrorCode::BadFrame);
    // A key spelled in upper case is another spelling, not another key: refused, never routed to a
    // recipient that would then fail to verify it.
    let upper = serde_json::to_string(&ClientFrame::Send(dm(&t.a, t.mesh, &t.b, 10, "c-up", "hi")))
        .expect("json")
        .replace(&t.b.key().to_string(), &t.b.key().to_string().to_uppercase());
    c.send_text(&upper).await;
    assert_eq!(expect_error(c.recv_non_presence().await, ErrorCode::BadFrame).id, Some(10));
    c.send_text(&format!(r#"{{"type":"roster","id":11,"pad":"{}"}}"#, "x".repeat(5000))).await;
    assert_eq!(
        expect_error(c.recv_non_presence().await, ErrorCode::FrameTooLarge).id,
        Some(11),
        "answered with its id"
    );
    let hello = hello_frame(&c.challenge.clone(), &t.a, t.mesh, "alice", Intent::Connect);
    c.send(&hello).await;
    expect_error(c.recv_non_presence().await, ErrorCode::AlreadyAuthenticated);
    // After all that the connection still works.
    c.send(&ClientFrame::Roster(mesh_proto::wire::RosterRequest { id: 10, after: None })).await;
    match c.recv_non_presence().await {
        ServerFrame::Roster(r) => {
            assert_eq!(r.id, 10);
            assert_eq!(r.peers.len(), 2);
            assert!(r.peers.iter().all(|p| p.online));
        }
        other => panic!("{other:?}"),
    }
    broker.stop().await;
}

async fn a_frame_over_the_hard_cap_gets_a_typed_error_before_close(backend: Backend) {
    let config = BrokerConfig { max_frame_bytes: 64 * 1024, ..BrokerConfig::default() };
    let broker = TestBroker::start_on(&backend, config).await;
    let mut t = two_members(&broker).await;
    t.ca.send_text(&"x".repeat(200 * 1024)).await;
    let mut saw_error = false;
    while let Some(frame) = t.ca.try_recv().await {
        if let ServerFrame::Error(e) = frame {
            assert_eq!(e.code, ErrorCode::FrameTooLarge);
            saw_error = true;
        }
    }
    assert!(saw_error, "closed without a frame_too_large error");
    broker.stop().await;
}

async fn presence_and_supersede(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let mut t = two_members(&broker).await;
    // alice saw bob come online
    match t.ca.recv().await {
        ServerFrame::Presence(p) => assert!(p.peer.online && p.peer.key == t.b.key()),
        other => panic!("{other:?}"),
    }
    let mut again = Client::connect(&broker).await;
    assert!(matches!(again.hello(&t.b, t.mesh, "bob", Intent::Connect).await, ServerFrame::Welcome(_)));
    expect_error(t.cb.recv().await, ErrorCode::Superseded);
    assert!(t.cb.try_recv().await.is_none());
    drop(again);
    // bob's last connection went away: alice sees him offline.
    loop {
        match t.ca.recv().await {
            ServerFrame::Presence(p) if !p.peer.online => break,
            ServerFrame::Presence(_) => continue,
            other => panic!("{other:?}"),
        }
    }
    broker.stop().await;
}

async fn rate_limit_is_typed_transient_and_never_refuses_a_duplicate(backend: Backend) {
    let config = BrokerConfig { sends_per_sec: 1, send_burst: 2, ..BrokerConfig::default() };
    let broker = TestBroker::start_on(&backend, config).await;
    let mut t = two_members(&broker).await;
    let first = dm(&t.a, t.mesh, &t.b, 1, "c-1", "one");
    t.ca.send(&ClientFrame::Send(first.clone())).await;
    assert!(matches!(t.ca.recv_non_presence().await, ServerFrame::Accepted(_)));
    t.ca.send(&ClientFrame::Send(dm(&t.a, t.mesh, &t.b, 2, "c-2", "two"))).await;
    assert!(matches!(t.ca.recv_non_presence().await, ServerFrame::Accepted(_)));
    t.ca.send(&ClientFrame::Send(dm(&t.a, t.mesh, &t.b, 3, "c-3", "three"))).await;
    let err = expect_error(t.ca.recv_non_presence().await, ErrorCode::RateLimited);
    assert!(!err.permanent);
    assert_eq!(err.id, Some(3));
    assert!(err.retry_after_ms.is_some_and(|ms| ms > 0 && ms <= 1000), "{err:?}");
    // Over the limit, a resend of an accepted message is still answered as a duplicate.
    t.ca.send(&ClientFrame::Send(mesh_proto::wire::SendMessage { id: 4, ..first })).await;
    match t.ca.recv_non_presence().await {
        ServerFrame::Accepted(a) => assert!(a.duplicate && a.id == 4),
        other => panic!("expected a duplicate answer, got {other:?}"),
    }
    broker.stop().await;
}

#[tokio::test]
async fn a_message_that_expires_undelivered_gets_an_expired_receipt() {
    let config = BrokerConfig { janitor_interval: std::time::Duration::from_millis(50), ..BrokerConfig::default() };
    let broker = TestBroker::start(config).await;
    let TwoMembers { mesh, a, b, mut ca, cb } = two_members(&broker).await;
    drop(cb);
    let send = mesh_proto::wire::SendMessage { ttl_ms: Some(1), ..dm(&a, mesh, &b, 1, "short-lived", "gone soon") };
    ca.send(&ClientFrame::Send(send)).await;
    let accepted = loop {
        if let ServerFrame::Accepted(x) = ca.recv_non_presence().await {
            break x;
        }
    };
    let receipt = loop {
        if let ServerFrame::Deliver(d) = ca.recv_non_presence().await {
            break d;
        }
    };
    match receipt.item {
        DeliveryItem::Receipt(r) => {
            assert_eq!((r.kind, r.recipient, r.message_id), (ReceiptKind::Expired, b.key(), accepted.message_id));
        }
        other => panic!("expected an expired receipt, got {other:?}"),
    }
    // The message left bob's queue: it will not be delivered late.
    let db = rusqlite::Connection::open(&broker.db_path).expect("open broker db");
    let queued: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM queue WHERE recipient = ?1 AND message_seq IS NOT NULL",
            [b.key().to_string()],
            |r| r.get(0),
        )
        .expect("count");
    assert_eq!(queued, 0);
    broker.stop().await;
}

async fn a_delivery_leased_by_a_superseded_connection_goes_to_the_new_one_at_once(backend: Backend) {
    // The default 30 s lease is longer than the test's wait: only the release wake-up can pass it.
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let mut t = two_members(&broker).await;
    t.ca.send(&ClientFrame::Send(dm(&t.a, t.mesh, &t.b, 1, "c-1", "not acked"))).await;
    let first = match t.cb.recv_non_presence().await {
        ServerFrame::Deliver(d) => d.delivery_id,
        other => panic!("{other:?}"),
    };
    let mut again = Client::connect(&broker).await;
    assert!(matches!(again.hello(&t.b, t.mesh, "bob", Intent::Connect).await, ServerFrame::Welcome(_)));
    match again.recv_non_presence().await {
        ServerFrame::Deliver(d) => assert_eq!(d.delivery_id, first),
        other => panic!("{other:?}"),
    }
    broker.stop().await;
}

async fn next_receipt(c: &mut Client) -> mesh_proto::wire::Receipt {
    loop {
        if let ServerFrame::Deliver(d) = c.recv_non_presence().await
            && let DeliveryItem::Receipt(r) = d.item
        {
            c.send(&ClientFrame::Ack(Ack { delivery_ids: vec![d.delivery_id] })).await;
            return r;
        }
    }
}

async fn read_receipts_reach_the_sender_once_and_only_from_an_addressee(backend: Backend) {
    use mesh_proto::wire::ReadReceipts;
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let mut t = two_members(&broker).await;
    t.ca.send(&ClientFrame::Send(dm(&t.a, t.mesh, &t.b, 1, "c-1", "please read"))).await;
    let ServerFrame::Accepted(accepted) = t.ca.recv_non_presence().await else { panic!("accepted") };
    let ServerFrame::Deliver(d) = t.cb.recv_non_presence().await else { panic!("deliver") };
    t.cb.send(&ClientFrame::Ack(Ack { delivery_ids: vec![d.delivery_id] })).await;
    assert_eq!(next_receipt(&mut t.ca).await.kind, ReceiptKind::Delivered);

    t.cb.send(&ClientFrame::Read(ReadReceipts {
        id: 7,
        message_ids: vec![accepted.message_id.clone(), "no-such-id".into()],
    }))
    .await;
    assert!(matches!(t.cb.recv_non_presence().await, ServerFrame::Ok(ok) if ok.id == 7));
    let read = next_receipt(&mut t.ca).await;
    assert_eq!((read.kind, read.recipient, read.client_message_id.as_str()), (ReceiptKind::Read, t.b.key(), "c-1"));

    // Again, and from someone the message was not for: acknowledged, but no receipt.
    t.cb.send(&ClientFrame::Read(ReadReceipts { id: 8, message_ids: vec![accepted.message_id.clone()] })).await;
    assert!(matches!(t.cb.recv_non_presence().await, ServerFrame::Ok(ok) if ok.id == 8));
    let carol = Identity::generate();
    let token = mint_invite(&t.a, t.mesh, &broker.url(), now_ms() + 60_000, None);
    let mut cc = Client::connect(&broker).await;
    let intent = join_intent(&token, &cc.challenge.clone(), &carol);
    assert!(matches!(cc.hello(&carol, t.mesh, "carol", intent).await, ServerFrame::Welcome(_)));
    cc.send(&ClientFrame::Read(ReadReceipts { id: 9, message_ids: vec![accepted.message_id] })).await;
    assert!(matches!(cc.recv_non_presence().await, ServerFrame::Ok(ok) if ok.id == 9));
    // The next thing alice gets is the receipt of a later message, not a second or a forged read.
    t.ca.send(&ClientFrame::Send(dm(&t.a, t.mesh, &t.b, 2, "c-2", "later"))).await;
    let ServerFrame::Deliver(d) = t.cb.recv_non_presence().await else { panic!("deliver") };
    t.cb.send(&ClientFrame::Ack(Ack { delivery_ids: vec![d.delivery_id] })).await;
    let next = next_receipt(&mut t.ca).await;
    assert_eq!((next.kind, next.client_message_id.as_str()), (ReceiptKind::Delivered, "c-2"));
    broker.stop().await;
}

async fn group_messages_reach_current_members_only(backend: Backend) {
    use mesh_proto::message::{Content, SealKey};
    use mesh_proto::wire::{GroupRequest, SendMessage};
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let mut t = two_members(&broker).await;
    let group_send = |id: u64, cmid: &str| {
        let to = mesh_proto::Target::Group("ops".into());
        let gk = mesh_proto::crypto::GroupKey::generate();
        let sealed =
            message::seal(&t.a, &t.mesh, cmid, &to, SealKey::Group(&gk), &Content { body: "x".into(), reply_to: None });
        SendMessage {
            id,
            client_message_id: cmid.into(),
            to,
            nonce: sealed.nonce,
            ciphertext: sealed.ciphertext,
            sig: sealed.sig,
            ttl_ms: None,
            key_epoch: None,
        }
    };
    t.ca.send(&ClientFrame::Send(group_send(1, "g-1"))).await;
    expect_error(t.ca.recv_non_presence().await, ErrorCode::RecipientUnknown);
    t.cb.send(&ClientFrame::JoinGroup(GroupRequest { id: 3, group: "ops".into() })).await;
    assert!(matches!(t.cb.recv_non_presence().await, ServerFrame::Ok(ok) if ok.id == 3));
    t.cb.send(&ClientFrame::JoinGroup(GroupRequest { id: 4, group: "Not Valid".into() })).await;
    expect_error(t.cb.recv_non_presence().await, ErrorCode::InvalidName);
    t.ca.send(&ClientFrame::Send(group_send(2, "g-2"))).await;
    assert!(matches!(t.ca.recv_non_presence().await, ServerFrame::Accepted(a) if a.recipients == 1));
    let ServerFrame::Deliver(d) = t.cb.recv_non_presence().await else { panic!("deliver") };
    let DeliveryItem::Message(env) = d.item else { panic!("message") };
    assert_eq!(env.to, mesh_proto::Target::Group("ops".into()));
    t.cb.send(&ClientFrame::LeaveGroup(GroupRequest { id: 5, group: "ops".into() })).await;
    assert!(matches!(t.cb.recv_non_presence().await, ServerFrame::Ok(ok) if ok.id == 5));
    t.ca.send(&ClientFrame::Send(group_send(3, "g-3"))).await;
    expect_error(t.ca.recv_non_presence().await, ErrorCode::RecipientUnknown);
    broker.stop().await;
}

async fn a_burst_of_frames_is_answered_in_order_each_send_on_its_own(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let mut t = two_members(&broker).await;
    let stranger = Identity::generate();
    let mut frames = Vec::new();
    for i in 1..=60u64 {
        let frame = match i {
            10 => ClientFrame::Send(mesh_proto::wire::SendMessage {
                nonce: vec![0; 3],
                ..dm(&t.a, t.mesh, &t.b, i, "c-10", "x")
            }),
            // The very same sealed message as request 5, sent again.
            20 => match &frames[4] {
                ClientFrame::Send(s) => ClientFrame::Send(mesh_proto::wire::SendMessage { id: 20, ..s.clone() }),
                _ => unreachable!(),
            },
            30 => ClientFrame::Send(dm(&t.a, t.mesh, &t.b, i, "c-6", "not message 6")),
            40 => ClientFrame::Send(dm(&t.a, t.mesh, &stranger, i, "c-40", "x")),
            45 => ClientFrame::Roster(mesh_proto::wire::RosterRequest { id: i, after: None }),
            _ => ClientFrame::Send(dm(&t.a, t.mesh, &t.b, i, &format!("c-{i}"), &format!("message {i}"))),
        };
        frames.push(frame);
    }
    // Written back to back and flushed once, so the broker reads them as one batch.
    for f in &frames {
        t.ca.ws.feed(tokio_tungstenite::tungstenite::Message::Text(f.to_json().into())).await.expect("feed");
    }
    t.ca.ws.flush().await.expect("flush");

    let mut first_of_5 = None;
    for i in 1..=60u64 {
        match (i, t.ca.recv_non_presence().await) {
            (10, f) => assert_eq!(expect_error(f, ErrorCode::BadFrame).id, Some(10)),
            (20, ServerFrame::Accepted(a)) => {
                assert!(a.duplicate, "a resend of c-5 in the same batch is a duplicate");
                assert_eq!(Some(a.message_id), first_of_5.clone());
            }
            (30, f) => assert_eq!(expect_error(f, ErrorCode::IdempotencyConflict).id, Some(30)),
            (40, f) => assert_eq!(expect_error(f, ErrorCode::RecipientUnknown).id, Some(40)),
            (45, ServerFrame::Roster(r)) => assert_eq!(r.id, 45),
            (_, ServerFrame::Accepted(a)) => {
                assert_eq!(a.id, i, "answers come in the order of the requests");
                assert!(!a.duplicate);
                if i == 5 {
                    first_of_5 = Some(a.message_id);
                }
            }
            (_, other) => panic!("request {i}: unexpected {other:?}"),
        }
    }
    // Bob gets exactly the stored ones, once each, in order.
    let expected: Vec<String> =
        (1..=60).filter(|i| ![10, 20, 30, 40, 45].contains(i)).map(|i| format!("message {i}")).collect();
    let mut got = Vec::new();
    while got.len() < expected.len() {
        let ServerFrame::Deliver(d) = t.cb.recv_non_presence().await else { panic!("deliver") };
        let DeliveryItem::Message(env) = &d.item else { panic!("a message") };
        got.push(message::open(env, &t.b, None).expect("opens").body);
        t.cb.send(&ClientFrame::Ack(Ack { delivery_ids: vec![d.delivery_id] })).await;
    }
    assert_eq!(got, expected);
    t.cb.send(&ClientFrame::Roster(mesh_proto::wire::RosterRequest { id: 7, after: None })).await;
    assert!(
        matches!(t.cb.recv_non_presence().await, ServerFrame::Roster(r) if r.id == 7),
        "nothing more was delivered"
    );
    broker.stop().await;
}

async fn a_connection_that_never_says_hello_is_closed_with_handshake_timeout(backend: Backend) {
    let config = BrokerConfig { handshake_timeout: std::time::Duration::from_millis(200), ..BrokerConfig::default() };
    let broker = TestBroker::start_on(&backend, config).await;
    let mut c = Client::connect(&broker).await;
    expect_error(c.recv().await, ErrorCode::HandshakeTimeout);
    assert!(c.try_recv().await.is_none(), "the connection is closed");
    broker.stop().await;
}

async fn session_attestations_that_are_forged_expired_or_for_another_key_are_refused(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let t = two_members(&broker).await;
    let session = Identity::generate();
    let now = now_ms();
    let good = SessionAttestation {
        v: 1,
        mesh_id: t.mesh,
        member: t.a.key(),
        session: session.key(),
        name: "worker".into(),
        issued_at: now,
        expires_at: now + 60_000,
    };
    let outsider = Identity::generate();
    let cases: Vec<(&str, &Identity, SessionAttestation, ErrorCode)> = vec![
        (
            "expired",
            &t.a,
            SessionAttestation { issued_at: now - 120_000, expires_at: now - 60_000, ..good.clone() },
            ErrorCode::AttestationExpired,
        ),
        (
            "longer than 24 h",
            &t.a,
            SessionAttestation { expires_at: now + 25 * 3_600_000, ..good.clone() },
            ErrorCode::AttestationExpired,
        ),
        (
            "from the future",
            &t.a,
            SessionAttestation { issued_at: now + 3_600_000, expires_at: now + 3_700_000, ..good.clone() },
            ErrorCode::AttestationExpired,
        ),
        (
            "for another session key",
            &t.a,
            SessionAttestation { session: outsider.key(), ..good.clone() },
            ErrorCode::AttestationInvalid,
        ),
        (
            "for another name",
            &t.a,
            SessionAttestation { name: "other".into(), ..good.clone() },
            ErrorCode::AttestationInvalid,
        ),
        (
            "by a key that is not a member",
            &outsider,
            SessionAttestation { member: outsider.key(), ..good.clone() },
            ErrorCode::UnknownMember,
        ),
    ];
    for (what, signer, att, code) in cases {
        let mut c = Client::connect(&broker).await;
        let hello = session_hello(&c, &session, t.mesh, "worker", signer, att);
        c.send(&hello).await;
        let frame = c.recv().await;
        assert!(matches!(&frame, ServerFrame::Error(e) if e.code == code), "{what}: expected {code:?}, got {frame:?}");
    }
    // A member's signature over claims naming another signer does not verify: forged.
    let mut c = Client::connect(&broker).await;
    let forged =
        session_hello(&c, &session, t.mesh, "worker", &t.b, SessionAttestation { member: t.b.key(), ..good.clone() });
    let ClientFrame::Hello(hello) = forged else { unreachable!() };
    let mut claims: HelloClaims = hello.auth.open().expect("opens");
    let mut att = claims.attestation.take().expect("attestation");
    let real: SessionAttestation = att.open().expect("opens");
    att.payload =
        mesh_proto::codec::b64(&serde_json::to_vec(&SessionAttestation { member: t.a.key(), ..real }).expect("json"));
    claims.attestation = Some(att);
    c.send(&signed_hello(&session, &claims)).await;
    expect_error(c.recv().await, ErrorCode::AttestationInvalid);
    // The genuine one is welcome.
    let mut c = Client::connect(&broker).await;
    let hello = session_hello(&c, &session, t.mesh, "worker", &t.a, good);
    c.send(&hello).await;
    assert!(matches!(c.recv().await, ServerFrame::Welcome(w) if w.you.member == t.a.key()));
    broker.stop().await;
}

async fn messages_acked_in_one_frame_come_back_as_one_receipts_item(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let mut t = two_members(&broker).await;
    let mut accepted = Vec::new();
    for i in 1..=3u64 {
        t.ca.send(&ClientFrame::Send(dm(&t.a, t.mesh, &t.b, i, &format!("c-{i}"), "x"))).await;
        let ServerFrame::Accepted(a) = t.ca.recv_non_presence().await else { panic!("accepted") };
        accepted.push(a.message_id);
    }
    let mut ids = Vec::new();
    while ids.len() < 3 {
        let ServerFrame::Deliver(d) = t.cb.recv_non_presence().await else { panic!("deliver") };
        ids.push(d.delivery_id);
    }
    t.cb.send(&ClientFrame::Ack(Ack { delivery_ids: ids })).await;
    let ServerFrame::Deliver(d) = t.ca.recv_non_presence().await else { panic!("deliver") };
    let DeliveryItem::Receipts(batch) = d.item else { panic!("expected one receipts item, got {:?}", d.item) };
    let got: Vec<_> = batch.receipts.iter().map(|r| (r.message_id.clone(), r.kind, r.recipient)).collect();
    let want: Vec<_> = accepted.iter().map(|m| (m.clone(), ReceiptKind::Delivered, t.b.key())).collect();
    assert_eq!(got, want);
    // Acked, it is gone: nothing more arrives for alice.
    t.ca.send(&ClientFrame::Ack(Ack { delivery_ids: vec![d.delivery_id] })).await;
    t.ca.send(&ClientFrame::Roster(mesh_proto::wire::RosterRequest { id: 5, after: None })).await;
    assert!(matches!(t.ca.recv_non_presence().await, ServerFrame::Roster(r) if r.id == 5));
    broker.stop().await;
}

/// The repeated-ack loss: an ack that arrives twice (a redelivery crossing the first ack, acked
/// again) must never remove an item that took the acked item's place. Delivery ids are never reused
/// for a recipient, not even for the item queued right after the newest one was acked.
async fn a_repeated_ack_never_removes_a_later_item(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let TwoMembers { mesh, a, b, mut ca, mut cb } = two_members(&broker).await;
    let deliver = async |cb: &mut Client| loop {
        if let ServerFrame::Deliver(d) = cb.recv_non_presence().await {
            let DeliveryItem::Message(env) = &d.item else { panic!("message expected") };
            return (d.delivery_id, message::open(env, &b, None).expect("opens").body);
        }
    };
    ca.send(&ClientFrame::Send(dm(&a, mesh, &b, 1, "x1", "first"))).await;
    assert!(matches!(ca.recv_non_presence().await, ServerFrame::Accepted(_)));
    let (first_id, body) = deliver(&mut cb).await;
    assert_eq!(body, "first");
    cb.send(&ClientFrame::Ack(Ack { delivery_ids: vec![first_id] })).await;
    // The delivered receipt tells us the ack was applied before the next send.
    assert!(matches!(next_receipt(&mut ca).await.kind, ReceiptKind::Delivered));

    ca.send(&ClientFrame::Send(dm(&a, mesh, &b, 2, "x2", "second"))).await;
    assert!(matches!(ca.recv_non_presence().await, ServerFrame::Accepted(_)));
    let (second_id, body) = deliver(&mut cb).await;
    assert_eq!(body, "second");
    assert_ne!(second_id, first_id, "a delivery id was handed out twice");

    // The late duplicate ack of the first item, then the connection drops without acking the second.
    cb.send(&ClientFrame::Ack(Ack { delivery_ids: vec![first_id] })).await;
    // A roster request answered after the ack proves the ack was handled before the disconnect.
    cb.send(&ClientFrame::Roster(mesh_proto::wire::RosterRequest { id: 9, after: None })).await;
    assert!(matches!(cb.recv_non_presence().await, ServerFrame::Roster(_)));
    drop(cb);

    let mut cb = Client::connect(&broker).await;
    assert!(matches!(cb.hello(&b, mesh, "bob", Intent::Connect).await, ServerFrame::Welcome(_)));
    let (again_id, body) = deliver(&mut cb).await;
    assert_eq!((again_id, body.as_str()), (second_id, "second"), "the unacked item comes back");
    broker.stop().await;
}
