//! One conformance suite for the broker's `Store`, run against SQLite and against a real PostgreSQL
//! (started by the tests, or `MESH_TEST_POSTGRES_URL`). Each case gets a store and a second handle
//! on the same data: for PostgreSQL another replica (its own pool and replica number), for SQLite
//! the same store (one process per database). Cases that race two calls race them on the two.

use std::collections::BTreeSet;
use std::sync::Arc;

use mesh_broker::SqliteStore;
use mesh_broker::Store;
use mesh_broker::store::postgres::{PgOptions, PgStore};
use mesh_broker::store::{
    Claimed, Enqueued, InviteRecord, JoinOutcome, MeshLimitSettings, MeshRecord, NewMessage, PeerRecord, StoreError,
};
use mesh_proto::wire::{DeliveryItem, PeerKind, Receipt, ReceiptKind, Role};
use mesh_proto::{Identity, MeshId, PublicKey, Target};

const LEASE: u64 = 30_000;
const FAR: u64 = u64::MAX / 4;

struct Stores {
    a: Arc<dyn Store>,
    /// Another replica on the same data (the same store for SQLite).
    b: Arc<dyn Store>,
    _dir: Option<tempfile::TempDir>,
}

fn sqlite() -> Stores {
    let dir = tempfile::tempdir().expect("tempdir");
    let store: Arc<dyn Store> = Arc::new(SqliteStore::open(&dir.path().join("b.db")).expect("sqlite store"));
    Stores { a: store.clone(), b: store, _dir: Some(dir) }
}

async fn postgres() -> Option<Stores> {
    let url = mesh_testkit::postgres::database()?;
    let options = PgOptions { pool_size: 4 };
    let a = PgStore::connect(&url, options.clone()).await.expect("first replica connects");
    let b = PgStore::connect(&url, options).await.expect("second replica connects");
    assert_ne!(a.replica(), b.replica(), "each replica has a number of its own");
    Some(Stores { a: Arc::new(a), b: Arc::new(b), _dir: None })
}

/// Each case, once per store.
macro_rules! conformance {
    ($($case:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    super::$case(super::sqlite()).await;
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    if let Some(stores) = super::postgres().await {
                        super::$case(stores).await;
                    }
                }
            )*
        }
    };
}

conformance!(
    a_mesh_is_created_once,
    sends_are_idempotent_on_their_client_id,
    a_refused_send_leaves_nothing_and_spares_its_batch,
    the_same_send_through_two_replicas_is_stored_once,
    leases_hold_items_until_acked_or_run_out,
    a_lease_is_released_only_by_its_own_connection,
    acks_delete_items_and_receipt_their_senders_once,
    delivery_ids_are_never_handed_out_twice,
    ttl_expiry_receipts_each_item_once_with_two_janitors,
    broadcasts_and_groups_reach_their_live_members,
    rosters_carry_groups_and_ended_sessions,
    names_are_unique_up_to_confusables_and_ended_sessions_give_them_up,
    the_last_use_of_an_invite_goes_to_one_joiner,
    reads_are_receipted_once_and_only_for_addressees,
    stale_sessions_end_and_leave_the_roster_once,
    mesh_limits_are_set_and_reset,
);

fn peer(id: &Identity, role: Role, name: &str) -> PeerRecord {
    let p = id.public();
    PeerRecord {
        key: p.key,
        kind: PeerKind::Member,
        member: p.key,
        name: name.into(),
        enc_key: p.enc_key,
        enc_sig: p.enc_sig,
        role,
        joined_at: 1,
        last_seen: None,
        revoked: false,
        ended_at: None,
        invited_by: None,
        revoked_at: None,
    }
}

/// An invite issued by `by` (valid for a day), as the handshake hands it to the store.
fn invite(id: &str, by: &Identity, max_uses: Option<u32>) -> InviteRecord {
    InviteRecord {
        invite_id: id.to_owned(),
        issued_by: by.key(),
        role: Role::Member,
        issued_at: 1,
        expires_at: u64::MAX / 2,
        max_uses,
        key_epoch: 0,
    }
}

fn session_of(member: &Identity, id: &Identity, name: &str) -> PeerRecord {
    PeerRecord { kind: PeerKind::Session, member: member.key(), ..peer(id, Role::Member, name) }
}

/// A mesh owned by the first identity, with the others as members (named m1, m2, …).
async fn mesh_with(store: &dyn Store, n: usize) -> (MeshId, Vec<Identity>) {
    let ids: Vec<Identity> = (0..n).map(|_| Identity::generate()).collect();
    let mesh = MeshId::generate();
    let record = MeshRecord {
        id: mesh,
        name: "team".into(),
        owner: ids[0].key(),
        created_at: 1,
        limits: Default::default(),
        key_epoch: 0,
        rekey_wanted: false,
    };
    store.create_mesh(record, peer(&ids[0], Role::Owner, "m0")).await.expect("mesh");
    for (i, id) in ids.iter().enumerate().skip(1) {
        store.upsert_peer(mesh, peer(id, Role::Member, &format!("m{i}"))).await.expect("member");
    }
    (mesh, ids)
}

fn msg(mesh: MeshId, from: &Identity, target: Target, cmid: &str) -> NewMessage {
    NewMessage {
        mesh_id: mesh,
        sender: from.key(),
        client_message_id: cmid.into(),
        fingerprint: fingerprint(cmid),
        target,
        message_id: format!("id-{cmid}"),
        key_epoch: None,
        item_json: format!("{{\"body\":\"{cmid}\"}}"),
        created_at: 1,
        expires_at: FAR,
    }
}

fn fingerprint(s: &str) -> [u8; 32] {
    let mut f = [0u8; 32];
    for (i, b) in s.bytes().enumerate() {
        f[i % 32] ^= b;
    }
    f
}

async fn send(store: &dyn Store, m: NewMessage) -> Result<Enqueued, StoreError> {
    let mut out = store.enqueue_many(vec![m]).await.expect("enqueue");
    out.pop().expect("one result")
}

/// Takes every item queued for `to` (as connection `conn`) and acks it; their JSON, in order.
async fn drain(store: &dyn Store, mesh: MeshId, to: &Identity, conn: u64, now: u64) -> Vec<String> {
    let lease = store.lease(mesh, to.key(), conn, 1000, now, LEASE).await.expect("lease");
    let ids = lease.items.iter().map(|l| l.delivery_id).collect();
    store.ack(mesh, to.key(), ids, now).await.expect("ack");
    lease.items.into_iter().map(|l| l.item_json).collect()
}

/// The receipts in `items` (`receipt` and `receipts` items alike).
fn receipts(items: &[String]) -> Vec<Receipt> {
    items
        .iter()
        .flat_map(|j| match serde_json::from_str::<DeliveryItem>(j).expect("a delivery item") {
            DeliveryItem::Receipt(r) => vec![r],
            DeliveryItem::Receipts(b) => b.receipts,
            DeliveryItem::Message(_) | DeliveryItem::Membership(_) | DeliveryItem::MeshKey(_) => vec![],
        })
        .collect()
}

async fn a_mesh_is_created_once(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 1).await;
    let again = MeshRecord {
        id: mesh,
        name: "other".into(),
        owner: ids[0].key(),
        created_at: 2,
        limits: Default::default(),
        key_epoch: 0,
        rekey_wanted: false,
    };
    let other = Identity::generate();
    match s.b.create_mesh(again, peer(&other, Role::Owner, "x")).await {
        Err(StoreError::MeshExists) => {}
        other => panic!("a second create of one mesh id: {other:?}"),
    }
    let stored = s.b.mesh(mesh).await.expect("read").expect("the mesh");
    assert_eq!((stored.name.as_str(), stored.owner), ("team", ids[0].key()), "the first create stands");
    assert!(s.b.peer(mesh, other.key()).await.expect("read").is_none(), "the refused create added nobody");
    assert!(s.a.mesh(MeshId::generate()).await.expect("read").is_none());
}

async fn sends_are_idempotent_on_their_client_id(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 2).await;
    let first = send(&*s.a, msg(mesh, &ids[0], Target::Key(ids[1].key()), "c1")).await.expect("stored");
    assert!(!first.duplicate);
    assert_eq!((first.recipients, first.woken.clone()), (1, vec![ids[1].key()]));
    let mut again = msg(mesh, &ids[0], Target::Key(ids[1].key()), "c1");
    again.message_id = "a-new-id".into();
    let dup = send(&*s.b, again).await.expect("a duplicate is not an error");
    assert!(dup.duplicate);
    assert_eq!(dup.message_id, first.message_id, "the first send's id");
    assert!(dup.woken.is_empty(), "nothing queued again");
    let mut changed = msg(mesh, &ids[0], Target::Key(ids[1].key()), "c1");
    changed.fingerprint[0] ^= 1;
    match send(&*s.a, changed).await {
        Err(StoreError::IdempotencyConflict(c)) => assert_eq!(c, "c1"),
        other => panic!("the same client id for another message: {other:?}"),
    }
    let found = s.b.find_sent(mesh, ids[0].key(), "c1").await.expect("read").expect("remembered");
    assert_eq!((found.message_id.as_str(), found.recipients), (first.message_id.as_str(), 1));
    assert!(s.b.find_sent(mesh, ids[1].key(), "c1").await.expect("read").is_none(), "per sender");
    assert_eq!(drain(&*s.a, mesh, &ids[1], 1, 10).await, ["{\"body\":\"c1\"}"], "queued once");
}

async fn a_refused_send_leaves_nothing_and_spares_its_batch(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 2).await;
    let stranger = Identity::generate();
    let results =
        s.a.enqueue_many(vec![
            msg(mesh, &ids[0], Target::Key(ids[1].key()), "ok1"),
            msg(mesh, &ids[0], Target::Key(stranger.key()), "bad"),
            msg(mesh, &ids[0], Target::Group("nobody".into()), "bad-group"),
            msg(mesh, &ids[0], Target::Key(ids[1].key()), "ok2"),
        ])
        .await
        .expect("the batch is stored");
    assert!(results[0].is_ok() && results[3].is_ok(), "{results:?}");
    assert!(matches!(results[1], Err(StoreError::RecipientUnknown(_))), "{:?}", results[1]);
    assert!(matches!(results[2], Err(StoreError::RecipientUnknown(_))), "{:?}", results[2]);
    assert!(s.b.find_sent(mesh, ids[0].key(), "bad").await.expect("read").is_none(), "a refused send is not kept");
    let bodies = drain(&*s.b, mesh, &ids[1], 1, 10).await;
    assert_eq!(bodies, ["{\"body\":\"ok1\"}", "{\"body\":\"ok2\"}"], "the others, in order");
    // A batch of DMs only (one connection's burst): repeats, a conflict and a stranger among new ones.
    let mut conflicting = msg(mesh, &ids[0], Target::Key(ids[1].key()), "ok2");
    conflicting.fingerprint[0] ^= 1;
    let results =
        s.b.enqueue_many(vec![
            msg(mesh, &ids[0], Target::Key(ids[1].key()), "d1"),
            msg(mesh, &ids[0], Target::Key(ids[1].key()), "ok1"),
            conflicting,
            msg(mesh, &ids[0], Target::Key(stranger.key()), "d-bad"),
            msg(mesh, &ids[0], Target::Key(ids[1].key()), "d2"),
        ])
        .await
        .expect("the batch is stored");
    let shape: Vec<String> = results
        .iter()
        .map(|r| match r {
            Ok(e) => format!("{} dup={} n={}", e.message_id, e.duplicate, e.recipients),
            Err(StoreError::IdempotencyConflict(c)) => format!("conflict {c}"),
            Err(StoreError::RecipientUnknown(_)) => "unknown".into(),
            Err(e) => format!("{e}"),
        })
        .collect();
    assert_eq!(
        shape,
        ["id-d1 dup=false n=1", "id-ok1 dup=true n=1", "conflict ok2", "unknown", "id-d2 dup=false n=1"],
        "each answered on its own, in order"
    );
    let bodies = drain(&*s.a, mesh, &ids[1], 2, 20).await;
    assert_eq!(bodies, ["{\"body\":\"d1\"}", "{\"body\":\"d2\"}"], "only the new ones queued, in order");
}

async fn the_same_send_through_two_replicas_is_stored_once(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 2).await;
    for round in 0..20 {
        let cmid = format!("race-{round}");
        let (x, y) = tokio::join!(
            send(&*s.a, msg(mesh, &ids[0], Target::Key(ids[1].key()), &cmid)),
            send(&*s.b, msg(mesh, &ids[0], Target::Key(ids[1].key()), &cmid)),
        );
        let (x, y) = (x.expect("stored"), y.expect("stored"));
        assert_eq!(x.message_id, y.message_id);
        assert!(x.duplicate != y.duplicate, "round {round}: exactly one stored it: {x:?} {y:?}");
    }
    assert_eq!(drain(&*s.a, mesh, &ids[1], 1, 10).await.len(), 20, "each send queued once");
}

async fn leases_hold_items_until_acked_or_run_out(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 2).await;
    for i in 0..5 {
        send(&*s.a, msg(mesh, &ids[0], Target::Key(ids[1].key()), &format!("c{i}"))).await.expect("stored");
    }
    let first = s.a.lease(mesh, ids[1].key(), 1, 3, 100, LEASE).await.expect("lease");
    assert_eq!(first.items.len(), 3, "at most the limit");
    assert!(first.items.iter().all(|l| !l.redelivery));
    let bodies: Vec<&str> = first.items.iter().map(|l| l.item_json.as_str()).collect();
    assert_eq!(bodies, ["{\"body\":\"c0\"}", "{\"body\":\"c1\"}", "{\"body\":\"c2\"}"], "oldest first");
    // Another replica's connection for the same key gets the rest, then nothing until a lease runs out.
    let second = s.b.lease(mesh, ids[1].key(), 2, 10, 101, LEASE).await.expect("lease");
    assert_eq!(second.items.len(), 2, "only the free items");
    let none = s.b.lease(mesh, ids[1].key(), 2, 10, 102, LEASE).await.expect("lease");
    assert!(none.items.is_empty(), "everything is leased");
    assert_eq!(none.next_foreign_expiry, Some(100 + LEASE), "free again when the first lease runs out");
    // Ack two of the first lease; the third runs out and goes to whoever leases next, as a redelivery.
    let acked: Vec<u64> = first.items[..2].iter().map(|l| l.delivery_id).collect();
    s.a.ack(mesh, ids[1].key(), acked, 200).await.expect("ack");
    let later = s.b.lease(mesh, ids[1].key(), 3, 10, 100 + LEASE, LEASE).await.expect("lease");
    assert_eq!(later.items.len(), 1, "the unacked item of the expired lease: {later:?}");
    assert_eq!(later.items[0].delivery_id, first.items[2].delivery_id);
    assert!(later.items[0].redelivery, "marked as a redelivery");
    // Expired items are never leased.
    let mut short = msg(mesh, &ids[0], Target::Key(ids[1].key()), "short");
    short.expires_at = 500;
    send(&*s.a, short).await.expect("stored");
    let past = s.a.lease(mesh, ids[1].key(), 4, 10, 500, LEASE).await.expect("lease");
    assert!(past.items.iter().all(|l| !l.item_json.contains("short")), "an item past its TTL is not delivered");
}

async fn a_lease_is_released_only_by_its_own_connection(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 2).await;
    send(&*s.a, msg(mesh, &ids[0], Target::Key(ids[1].key()), "c")).await.expect("stored");
    let held = s.a.lease(mesh, ids[1].key(), 7, 10, 100, LEASE).await.expect("lease");
    assert_eq!(held.items.len(), 1);
    // Another replica releasing a connection with the same number frees nothing of this one's.
    s.b.release(mesh, ids[1].key(), 8).await.expect("release");
    if !Arc::ptr_eq(&s.a, &s.b) {
        s.b.release(mesh, ids[1].key(), 7).await.expect("release");
    }
    assert!(s.b.lease(mesh, ids[1].key(), 9, 10, 101, LEASE).await.expect("lease").items.is_empty(), "still held");
    s.a.release(mesh, ids[1].key(), 7).await.expect("release");
    let again = s.b.lease(mesh, ids[1].key(), 9, 10, 102, LEASE).await.expect("lease");
    assert_eq!(again.items.len(), 1, "free once its connection released it");
    assert!(!again.items[0].redelivery, "a released item is not a redelivery of a lapsed lease");
}

async fn acks_delete_items_and_receipt_their_senders_once(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 3).await;
    for i in 0..3 {
        send(&*s.a, msg(mesh, &ids[0], Target::Key(ids[2].key()), &format!("a{i}"))).await.expect("stored");
    }
    send(&*s.a, msg(mesh, &ids[1], Target::Key(ids[2].key()), "b0")).await.expect("stored");
    let lease = s.a.lease(mesh, ids[2].key(), 1, 10, 100, LEASE).await.expect("lease");
    let all: Vec<u64> = lease.items.iter().map(|l| l.delivery_id).collect();
    // Someone else acking these ids removes nothing.
    s.b.ack(mesh, ids[1].key(), all.clone(), 150).await.expect("ack");
    let (x, y) = tokio::join!(s.a.ack(mesh, ids[2].key(), all.clone(), 200), s.b.ack(mesh, ids[2].key(), all, 200));
    let (x, y) = (x.expect("ack"), y.expect("ack"));
    assert_eq!(x.receipts + y.receipts, 4, "one receipt per message, however many times acked: {x:?} {y:?}");
    let woken: BTreeSet<PublicKey> = x.woken.into_iter().chain(y.woken).collect();
    assert_eq!(woken, BTreeSet::from([ids[0].key(), ids[1].key()]), "both senders woken");
    assert!(s.a.lease(mesh, ids[2].key(), 2, 10, 100 + LEASE, LEASE).await.expect("lease").items.is_empty(), "gone");
    let to_first = drain(&*s.b, mesh, &ids[0], 3, 300).await;
    let got = receipts(&to_first);
    let cmids: Vec<&str> = got.iter().map(|r| r.client_message_id.as_str()).collect();
    assert_eq!(cmids, ["a0", "a1", "a2"], "in the order acked");
    assert!(got.iter().all(|r| r.kind == ReceiptKind::Delivered && r.recipient == ids[2].key() && r.at == 200));
    assert_eq!(to_first.len(), 1, "one item carries a sender's receipts of one ack");
    assert_eq!(receipts(&drain(&*s.b, mesh, &ids[1], 4, 300).await).len(), 1);
}

async fn delivery_ids_are_never_handed_out_twice(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 2).await;
    let mut seen = BTreeSet::new();
    for i in 0..10 {
        let store = if i % 2 == 0 { &s.a } else { &s.b };
        send(&**store, msg(mesh, &ids[0], Target::Key(ids[1].key()), &format!("c{i}"))).await.expect("stored");
        for (who, conn) in [(&ids[1], 1), (&ids[0], 2)] {
            let lease = store.lease(mesh, who.key(), conn, 10, 100 + i, LEASE).await.expect("lease");
            for item in &lease.items {
                assert!(seen.insert(item.delivery_id), "delivery id {} handed out twice", item.delivery_id);
            }
            store
                .ack(mesh, who.key(), lease.items.iter().map(|l| l.delivery_id).collect(), 100 + i)
                .await
                .expect("ack");
        }
    }
    assert_eq!(seen.len(), 20, "ten messages and ten receipts");
}

async fn ttl_expiry_receipts_each_item_once_with_two_janitors(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 4).await;
    for i in 0..50 {
        let mut m = msg(mesh, &ids[0], Target::All, &format!("b{i}"));
        m.expires_at = 1_000;
        send(&*s.a, m).await.expect("stored");
    }
    // One recipient took its copies before the TTL: those are not expired.
    assert_eq!(drain(&*s.a, mesh, &ids[1], 1, 500).await.len(), 50);
    let (x, y) = tokio::join!(s.a.expire(1_000), s.b.expire(1_000));
    let (x, y) = (x.expect("janitor"), y.expect("janitor"));
    assert_eq!(x.messages_expired + y.messages_expired, 100, "two recipients' copies, each once: {x:?} {y:?}");
    assert_eq!(x.receipts + y.receipts, 100);
    assert_eq!(s.a.expire(1_001).await.expect("janitor").messages_expired, 0, "nothing left to expire");
    let to_sender = receipts(&drain(&*s.b, mesh, &ids[0], 2, 1_001).await);
    let expired = to_sender.iter().filter(|r| r.kind == ReceiptKind::Expired).count();
    let delivered = to_sender.iter().filter(|r| r.kind == ReceiptKind::Delivered).count();
    assert_eq!((expired, delivered), (100, 50), "one receipt per copy, of the right kind");
    let mut per_copy: Vec<(String, PublicKey)> = to_sender
        .iter()
        .filter(|r| r.kind == ReceiptKind::Expired)
        .map(|r| (r.message_id.clone(), r.recipient))
        .collect();
    per_copy.sort();
    per_copy.dedup();
    assert_eq!(per_copy.len(), 100, "no copy receipted twice");
    assert!(s.a.find_sent(mesh, ids[0].key(), "b0").await.expect("read").is_none(), "forgotten past its TTL");
}

async fn broadcasts_and_groups_reach_their_live_members(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 3).await;
    let member = &ids[1];
    let (live, ended) = (Identity::generate(), Identity::generate());
    s.a.upsert_peer(mesh, session_of(member, &live, "live")).await.expect("session");
    s.a.upsert_peer(mesh, session_of(member, &ended, "ended")).await.expect("session");
    s.b.end_session(mesh, member.key(), ended.key(), 10, 8).await.expect("ended");
    let all = send(&*s.a, msg(mesh, &ids[0], Target::All, "all")).await.expect("stored");
    let woken: BTreeSet<_> = all.woken.into_iter().collect();
    assert_eq!(woken, BTreeSet::from([ids[1].key(), ids[2].key(), live.key()]), "not the sender, not an ended session");
    assert_eq!(all.recipients, 3);
    assert_eq!(s.b.set_group(mesh, ids[0].key(), "ops".into(), true).await.expect("join"), ["ops"]);
    assert_eq!(s.b.set_group(mesh, ids[2].key(), "ops".into(), true).await.expect("join"), ["ops"]);
    assert_eq!(s.a.set_group(mesh, ids[2].key(), "ops".into(), true).await.expect("again"), ["ops"], "idempotent");
    s.a.set_group(mesh, ended.key(), "ops".into(), true).await.expect("join");
    let group = send(&*s.a, msg(mesh, &ids[0], Target::Group("ops".into()), "ops")).await.expect("stored");
    assert_eq!(group.woken, [ids[2].key()], "the group's live members but the sender");
    assert!(s.b.set_group(mesh, ids[2].key(), "ops".into(), false).await.expect("leave").is_empty());
    match send(&*s.b, msg(mesh, &ids[0], Target::Group("ops".into()), "ops2")).await {
        Err(StoreError::RecipientUnknown(why)) => assert!(why.contains("@ops"), "{why}"),
        other => panic!("a group with nobody else: {other:?}"),
    }
    // A DM to an ended session still queues (for its next launch).
    assert_eq!(send(&*s.a, msg(mesh, &ids[0], Target::Key(ended.key()), "dm")).await.expect("stored").recipients, 1);
}

async fn rosters_carry_groups_and_ended_sessions(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 2).await;
    let sessions: Vec<Identity> = (0..4).map(|_| Identity::generate()).collect();
    for (i, sess) in sessions.iter().enumerate() {
        s.a.upsert_peer(mesh, session_of(&ids[1], sess, &format!("s{i}"))).await.expect("session");
    }
    s.a.set_group(mesh, ids[1].key(), "b".into(), true).await.expect("group");
    s.a.set_group(mesh, ids[1].key(), "a".into(), true).await.expect("group");
    assert_eq!(s.b.live_sessions(mesh, ids[1].key()).await.expect("count"), 4);
    // Ending sessions keeps the newest one ended session; older ones leave the roster.
    let first = s.b.end_session(mesh, ids[1].key(), sessions[0].key(), 10, 1).await.expect("end");
    assert_eq!(first.ended.as_ref().and_then(|p| p.ended_at), Some(10));
    assert!(first.removed.is_empty());
    let second = s.a.end_session(mesh, ids[1].key(), sessions[1].key(), 20, 1).await.expect("end");
    assert_eq!(second.removed.iter().map(|p| p.key).collect::<Vec<_>>(), [sessions[0].key()], "the older one left");
    assert_eq!(s.a.end_session(mesh, ids[1].key(), sessions[1].key(), 30, 1).await.expect("again"), Default::default());
    match s.a.end_session(mesh, ids[0].key(), sessions[2].key(), 30, 1).await {
        Err(StoreError::Forbidden(_)) => {}
        other => panic!("ending someone else's session: {other:?}"),
    }
    assert_eq!(s.b.live_sessions(mesh, ids[1].key()).await.expect("count"), 2);
    let roster = s.b.roster(mesh).await.expect("roster");
    let names: Vec<&str> = roster.iter().map(|e| e.peer.name.as_str()).collect();
    assert_eq!(names.len(), 5, "{names:?}");
    assert!(!names.contains(&"s0"), "{names:?}");
    let m1 = roster.iter().find(|e| e.peer.key == ids[1].key()).expect("m1");
    assert_eq!(m1.groups, ["a", "b"], "groups in order");
    let s1 = roster.iter().find(|e| e.peer.key == sessions[1].key()).expect("s1");
    assert_eq!((s1.peer.kind, s1.peer.member, s1.peer.ended_at), (PeerKind::Session, ids[1].key(), Some(20)));
    // A session that comes back is live again.
    s.a.upsert_peer(mesh, session_of(&ids[1], &sessions[1], "s1")).await.expect("back");
    assert_eq!(s.b.peer(mesh, sessions[1].key()).await.expect("read").expect("peer").ended_at, None);
    s.a.touch_peer(mesh, ids[1].key(), 777).await.expect("touch");
    assert_eq!(s.b.peer(mesh, ids[1].key()).await.expect("read").expect("peer").last_seen, Some(777));
}

async fn names_are_unique_up_to_confusables_and_ended_sessions_give_them_up(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 2).await;
    let newcomer = Identity::generate();
    for taken in ["m1", "M1", "m\u{0031}"] {
        match s.b.upsert_peer(mesh, peer(&newcomer, Role::Member, taken)).await {
            Err(StoreError::NameTaken { holder, .. }) => assert!(holder.contains("m1"), "{holder}"),
            other => panic!("{taken:?} while m1 holds it: {other:?}"),
        }
    }
    assert!(s.a.peer(mesh, newcomer.key()).await.expect("read").is_none(), "a refused peer is not added");
    match s.a.rename(mesh, ids[1].key(), "M0".into()).await {
        Err(StoreError::NameTaken { .. }) => {}
        other => panic!("renaming onto a confusable: {other:?}"),
    }
    let (renamed, _) = s.b.rename(mesh, ids[1].key(), "builder".into()).await.expect("rename");
    assert_eq!(renamed.name, "builder");
    // An ended session's name goes to the next peer that asks, and the session leaves the roster.
    let (old, new) = (Identity::generate(), Identity::generate());
    s.a.upsert_peer(mesh, session_of(&ids[1], &old, "worker")).await.expect("session");
    s.a.end_session(mesh, ids[1].key(), old.key(), 10, 8).await.expect("ended");
    let claimed: Claimed = s.b.upsert_peer(mesh, session_of(&ids[1], &new, "Worker")).await.expect("claims it");
    assert_eq!(claimed.reaped.iter().map(|p| p.key).collect::<Vec<_>>(), [old.key()]);
    assert!(s.a.peer(mesh, old.key()).await.expect("read").is_none());
    // Two peers claiming one name at once through two replicas: one gets it.
    let (x, y) = (Identity::generate(), Identity::generate());
    let (rx, ry) = tokio::join!(
        s.a.upsert_peer(mesh, peer(&x, Role::Member, "racer")),
        s.b.upsert_peer(mesh, peer(&y, Role::Member, "racer")),
    );
    assert!(rx.is_ok() != ry.is_ok(), "exactly one holds the name: {rx:?} {ry:?}");
}

async fn the_last_use_of_an_invite_goes_to_one_joiner(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 1).await;
    let owner = &ids[0];
    for round in 0..10 {
        let id = format!("inv-{round}");
        let (x, y) = (Identity::generate(), Identity::generate());
        let (rx, ry) = tokio::join!(
            s.a.join(mesh, invite(&id, owner, Some(1)), peer(&x, Role::Member, &format!("x{round}"))),
            s.b.join(mesh, invite(&id, owner, Some(1)), peer(&y, Role::Member, &format!("y{round}"))),
        );
        let joined = [&rx, &ry].iter().filter(|r| matches!(r, Ok(JoinOutcome::Joined(..)))).count();
        let exhausted = [&rx, &ry].iter().filter(|r| matches!(r, Err(StoreError::InviteExhausted))).count();
        assert_eq!((joined, exhausted), (1, 1), "round {round}: {rx:?} {ry:?}");
    }
    // A member joining again consumes nothing; a refused name consumes nothing.
    let z = Identity::generate();
    assert!(matches!(
        s.a.join(mesh, invite("two", owner, Some(2)), peer(&z, Role::Member, "z")).await,
        Ok(JoinOutcome::Joined(..))
    ));
    assert!(matches!(
        s.b.join(mesh, invite("two", owner, Some(2)), peer(&z, Role::Member, "z")).await,
        Ok(JoinOutcome::AlreadyMember(_))
    ));
    let w = Identity::generate();
    assert!(matches!(
        s.a.join(mesh, invite("two", owner, Some(2)), peer(&w, Role::Member, "z")).await,
        Err(StoreError::NameTaken { .. })
    ));
    assert!(matches!(
        s.b.join(mesh, invite("two", owner, Some(2)), peer(&w, Role::Member, "w")).await,
        Ok(JoinOutcome::Joined(..))
    ));
    let v = Identity::generate();
    assert!(matches!(
        s.a.join(mesh, invite("two", owner, Some(2)), peer(&v, Role::Member, "v")).await,
        Err(StoreError::InviteExhausted)
    ));
    assert!(matches!(
        s.a.join(mesh, invite("none", owner, Some(0)), peer(&v, Role::Member, "v")).await,
        Err(StoreError::InviteExhausted)
    ));
    assert!(matches!(
        s.a.join(mesh, invite("open", owner, None), peer(&v, Role::Member, "v")).await,
        Ok(JoinOutcome::Joined(..))
    ));
}

async fn reads_are_receipted_once_and_only_for_addressees(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 3).await;
    send(&*s.a, msg(mesh, &ids[0], Target::Key(ids[1].key()), "dm")).await.expect("stored");
    send(&*s.a, msg(mesh, &ids[0], Target::All, "all")).await.expect("stored");
    s.a.set_group(mesh, ids[2].key(), "g".into(), true).await.expect("group");
    send(&*s.a, msg(mesh, &ids[0], Target::Group("g".into()), "grp")).await.expect("stored");
    let ids_read = vec!["id-dm".to_owned(), "id-all".into(), "id-grp".into(), "id-unknown".into()];
    let (x, y) = tokio::join!(
        s.a.record_reads(mesh, ids[1].key(), ids_read.clone(), 50),
        s.b.record_reads(mesh, ids[1].key(), ids_read.clone(), 50),
    );
    assert_eq!(x.expect("reads").receipts + y.expect("reads").receipts, 2, "dm and broadcast, once each");
    let third = s.b.record_reads(mesh, ids[2].key(), ids_read, 60).await.expect("reads");
    assert_eq!((third.receipts, third.woken), (2, vec![ids[0].key()]), "broadcast and group, not the DM");
    let got = receipts(&drain(&*s.a, mesh, &ids[0], 1, 70).await);
    let mut reads: Vec<(&str, PublicKey)> = got
        .iter()
        .filter(|r| r.kind == ReceiptKind::Read)
        .map(|r| (r.client_message_id.as_str(), r.recipient))
        .collect();
    reads.sort();
    let mut want = vec![("all", ids[1].key()), ("all", ids[2].key()), ("dm", ids[1].key()), ("grp", ids[2].key())];
    want.sort();
    assert_eq!(reads, want);
}

async fn stale_sessions_end_and_leave_the_roster_once(s: Stores) {
    let (mesh, ids) = mesh_with(&*s.a, 2).await;
    let (stale, online, fresh) = (Identity::generate(), Identity::generate(), Identity::generate());
    for (sess, name, seen) in [(&stale, "stale", 100), (&online, "online", 100), (&fresh, "fresh", 5_000)] {
        let mut p = session_of(&ids[1], sess, name);
        p.last_seen = Some(seen);
        s.a.upsert_peer(mesh, p).await.expect("session");
    }
    let online_now = vec![(mesh, online.key())];
    let (x, y) = tokio::join!(
        s.a.reap_sessions(6_000, 1_000, 10_000, online_now.clone()),
        s.b.reap_sessions(6_000, 1_000, 10_000, online_now.clone()),
    );
    let (x, y) = (x.expect("reap"), y.expect("reap"));
    let ended: Vec<PublicKey> = x.ended.iter().chain(&y.ended).map(|(_, p)| p.key).collect();
    assert_eq!(ended, [stale.key()], "the stale session, once; not the connected one nor the fresh one");
    assert_eq!(x.ended.iter().chain(&y.ended).next().map(|(m, p)| (*m, p.ended_at)), Some((mesh, Some(6_000))));
    assert!(x.removed.is_empty() && y.removed.is_empty(), "not yet past the grace period");
    s.a.set_group(mesh, stale.key(), "g".into(), true).await.expect("group");
    let (x, y) = tokio::join!(
        s.a.reap_sessions(20_000, 1_000_000, 10_000, online_now.clone()),
        s.b.reap_sessions(20_000, 1_000_000, 10_000, online_now),
    );
    let (x, y) = (x.expect("reap"), y.expect("reap"));
    let removed: Vec<PublicKey> = x.removed.iter().chain(&y.removed).map(|(_, p)| p.key).collect();
    assert_eq!(removed, [stale.key()], "removed once after the grace period");
    assert!(s.b.peer(mesh, stale.key()).await.expect("read").is_none());
    let roster = s.a.roster(mesh).await.expect("roster");
    assert!(roster.iter().all(|e| e.peer.key != stale.key()), "gone from the roster, with its groups");
}

async fn mesh_limits_are_set_and_reset(s: Stores) {
    let (mesh, _) = mesh_with(&*s.a, 1).await;
    let set = MeshLimitSettings {
        sessions_per_member: Some(3),
        connections_per_member: None,
        connections: Some(4_000_000_000),
    };
    assert_eq!(s.a.set_mesh_limits(mesh, false, set).await.expect("set"), set);
    let more = MeshLimitSettings { connections_per_member: Some(9), ..Default::default() };
    let now = s.b.set_mesh_limits(mesh, false, more).await.expect("set");
    assert_eq!(now, MeshLimitSettings { connections_per_member: Some(9), ..set }, "unchanged settings stay");
    assert_eq!(s.b.mesh(mesh).await.expect("read").expect("mesh").limits, now);
    let reset = MeshLimitSettings { connections: Some(5), ..Default::default() };
    assert_eq!(s.a.set_mesh_limits(mesh, true, reset).await.expect("reset"), reset, "reset, then the new value");
    assert!(s.a.set_mesh_limits(MeshId::generate(), false, set).await.is_err(), "an unknown mesh");
}
