//! The webhook state machine on a real `daemon.db`, with explicit clocks.

use mesh_ipc::api::{InboxMessage, InboxStatus, PresenceEvent, TargetKind};
use mesh_proto::wire::PeerKind;

use super::*;

const H: u64 = 3600 * 1000;

fn member() -> PublicKey {
    PublicKey([1; 32])
}
fn session() -> PublicKey {
    PublicKey([2; 32])
}
fn peer() -> PublicKey {
    PublicKey([3; 32])
}
fn mesh_a() -> MeshId {
    MeshId([1; 16])
}
fn mesh_b() -> MeshId {
    MeshId([2; 16])
}

fn hook(owner: PublicKey, owner_mesh: Option<MeshId>, events: &[&str]) -> NewWebhook {
    NewWebhook {
        owner,
        owner_mesh,
        url: "http://127.0.0.1:1/hook".into(),
        events: events.iter().map(|e| e.to_string()).collect(),
        mesh: None,
        peer: None,
        description: None,
        allow_insecure_http: false,
    }
}

fn message(id: i64, from: &PublicKey) -> EventBody {
    EventBody::Message(InboxMessage {
        id,
        mesh: "team".into(),
        message_id: format!("m{id}"),
        from: from.to_string(),
        from_name: "bob".into(),
        kind: TargetKind::Direct,
        to: "x".into(),
        status: InboxStatus::Ready,
        body: Some(format!("hello {id}")),
        error: None,
        sent_at: 1,
        received_at: 2,
        read_at: None,
        deleted: false,
    })
}

fn presence(key: &PublicKey) -> EventBody {
    EventBody::Presence(PresenceEvent {
        key: key.to_string(),
        name: "bob".into(),
        kind: PeerKind::Member,
        online: true,
        ended_at: None,
        removed: false,
    })
}

/// (webhook id, event type) of every delivery, in order.
fn queued(c: &Connection) -> Vec<(i64, String)> {
    c.prepare("SELECT webhook_id, event_type FROM webhook_deliveries ORDER BY id")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

#[test]
fn an_endpoint_gets_exactly_its_owners_events() {
    let (_dir, db) = crate::store::temp_db();
    db.call_blocking(|c| {
        let (m, _) = add(c, &hook(member(), None, &["message", "receipt", "presence"]), 1)?;
        let (s, _) = add(c, &hook(session(), Some(mesh_a()), &["message", "presence"]), 1)?;
        let (only_b, _) = add(c, &NewWebhook { mesh: Some(mesh_b()), ..hook(member(), None, &["message"]) }, 1)?;
        let (from_peer, _) = add(c, &NewWebhook { peer: Some(peer()), ..hook(member(), None, &["message"]) }, 1)?;
        let (off, _) = add(c, &hook(member(), None, &["message"]), 1)?;
        set_enabled(c, Visible::All, off, false, Some("by the user"), 1)?;
        c.execute("DELETE FROM webhook_deliveries", [])?; // the disable event asked for no delivery anyway

        events::append(c, Some(&mesh_a()), Some(&member()), &message(1, &peer()), 2)?;
        events::append(c, Some(&mesh_a()), Some(&session()), &message(2, &peer()), 2)?;
        events::append(c, Some(&mesh_b()), Some(&member()), &message(3, &session()), 2)?;
        events::append(c, Some(&mesh_a()), None, &presence(&peer()), 2)?;
        events::append(c, Some(&mesh_b()), None, &presence(&peer()), 2)?;
        let other = PublicKey([9; 32]);
        events::append(c, Some(&mesh_a()), Some(&other), &message(4, &peer()), 2)?;
        let read = EventBody::Read { ids: vec![1] };
        events::append(c, Some(&mesh_a()), Some(&member()), &read, 2)?;

        let m_ = |t: &str| (m, t.to_owned());
        assert_eq!(
            queued(c),
            vec![
                m_("message"),
                (from_peer, "message".into()),
                (off, "message".into()),
                (s, "message".into()),
                m_("message"),
                (only_b, "message".into()),
                (off, "message".into()),
                m_("presence"),
                (s, "presence".into()),
                m_("presence"),
            ],
            "the member's, the session's, mesh and peer filters, kinds; a disabled endpoint still queues; \
             nobody else's message and no unasked kind"
        );
        Ok(())
    })
    .expect("db");
}

#[test]
fn the_payload_is_a_standard_webhook_body_and_deleting_the_message_scrubs_it() {
    let (_dir, db) = crate::store::temp_db();
    db.call_blocking(|c| {
        c.execute(
            "INSERT INTO inbox (id, mesh_id, recipient, message_id, sender, sender_name, client_message_id, target, raw,
                 status, sent_at, received_at, body) VALUES (7, ?1, ?2, 'm7', ?3, 'bob', 'c7', 't', '{}', 'ready', 1, 1, 'hello 7')",
            params![mesh_a().to_string(), member().to_string(), peer().to_string()],
        )?;
        add(c, &hook(member(), None, &["message"]), 1)?;
        let event = events::append(c, Some(&mesh_a()), Some(&member()), &message(7, &peer()), 1_600_000_000_000)?;
        let payload: String = c.query_row("SELECT payload FROM webhook_deliveries", [], |r| r.get(0))?;
        let v: serde_json::Value = serde_json::from_str(&payload).expect("json");
        assert_eq!(v["type"], "message");
        assert_eq!(v["timestamp"], "2020-09-13T12:26:40.000Z");
        assert_eq!(v["data"]["body"], "hello 7");
        assert_eq!(v["data"]["from"], peer().to_string());
        assert_eq!(v["data"]["mesh"], "team");
        assert_eq!(v["data"]["mesh_id"], mesh_a().to_string());
        assert_eq!(v["data"]["audience"], member().to_string());
        assert_eq!(v["data"]["event_id"], event);
        c.execute("DELETE FROM inbox WHERE id = 7", [])?;
        let payload: String = c.query_row("SELECT payload FROM webhook_deliveries", [], |r| r.get(0))?;
        assert!(!payload.contains("hello 7"), "{payload}");
        assert!(payload.contains(r#""deleted":true"#), "{payload}");
        Ok(())
    })
    .expect("db");
}

fn queue_n(c: &Connection, n: i64) -> rusqlite::Result<()> {
    for i in 0..n {
        events::append(c, Some(&mesh_a()), Some(&member()), &message(100 + i, &peer()), 10)?;
    }
    Ok(())
}

fn caps(free: usize, per_endpoint: u32) -> Caps {
    Caps { free, per_endpoint, limited: usize::MAX }
}

fn ids(claimed: &Claimed) -> Vec<i64> {
    claimed.jobs.iter().map(|j| j.delivery).collect()
}

#[test]
fn one_in_flight_per_endpoint_in_order_and_a_lease_that_runs_out_comes_back() {
    let (_dir, db) = crate::store::temp_db();
    let cfg = Config::default();
    db.call_blocking(|c| {
        add(c, &hook(member(), None, &["message"]), 1)?;
        queue_n(c, 3)?;
        let first = claim(c, caps(8, 1), 0, 1000, 20)?;
        assert_eq!(ids(&first), vec![1], "one at a time to one endpoint, the oldest first");
        assert_eq!(ids(&claim(c, caps(8, 1), 0, 1000, 21)?), Vec::<i64>::new(), "none while it is in flight");
        // The worker died: after its lease the row is claimable again, by the same rule.
        let again = claim(c, caps(8, 1), 0, 1000, 1021)?;
        assert_eq!(ids(&again), vec![1]);
        assert_eq!(again.jobs[0].uid, first.jobs[0].uid, "the same webhook-id on every attempt");
        assert_eq!(
            settle(c, &first.jobs[0], &Outcome::Delivered { status: 200, slow: false }, &cfg, 1022, 0.5)?,
            Settled::Stale,
            "the first holder's lease is gone: its late answer records nothing"
        );
        assert_eq!(
            settle(c, &again.jobs[0], &Outcome::Delivered { status: 204, slow: false }, &cfg, 1023, 0.5)?,
            Settled::Delivered
        );
        assert_eq!(ids(&claim(c, caps(8, 1), 0, 1000, 1024)?), vec![2]);
        Ok(())
    })
    .expect("db");
}

#[test]
fn endpoints_take_turns_within_the_global_cap() {
    let (_dir, db) = crate::store::temp_db();
    db.call_blocking(|c| {
        for _ in 0..3 {
            add(c, &hook(member(), None, &["message"]), 1)?;
        }
        queue_n(c, 2)?; // deliveries 1..=6: two per endpoint
        let webhooks = |cl: &Claimed| cl.jobs.iter().map(|j| j.webhook).collect::<Vec<_>>();
        assert_eq!(webhooks(&claim(c, caps(2, 1), 0, 1000, 20)?), vec![1, 2]);
        assert_eq!(
            webhooks(&claim(c, caps(2, 1), 2, 1000, 20)?),
            vec![3],
            "the third endpoint's turn; the others are busy"
        );
        Ok(())
    })
    .expect("db");
}

#[test]
fn endpoints_not_known_to_answer_promptly_share_only_part_of_the_slots() {
    let (_dir, db) = crate::store::temp_db();
    db.call_blocking(|c| {
        for _ in 0..6 {
            add(c, &hook(member(), None, &["message"]), 1)?;
        }
        queue_n(c, 1)?; // one delivery per endpoint
        // 1: failing; 2: slow to succeed; 3: never answered; 4, 5, 6: answer at once.
        c.execute("UPDATE webhooks SET last_success_at = 1 WHERE id != 3", [])?;
        c.execute("UPDATE webhooks SET failing_since = 5 WHERE id = 1", [])?;
        c.execute("UPDATE webhooks SET slow = 1 WHERE id = 2", [])?;
        let cl = claim(c, Caps { free: 8, per_endpoint: 1, limited: 2 }, 0, 1000, 20)?;
        let webhooks: Vec<i64> = cl.jobs.iter().map(|j| j.webhook).collect();
        assert_eq!(webhooks, vec![1, 2, 4, 5, 6], "two limited endpoints at most; the prompt ones all get a slot");
        let cl = claim(c, Caps { free: 3, per_endpoint: 1, limited: 2 }, 0, 1000, 21)?;
        assert!(cl.jobs.is_empty(), "the limited share is in use: {:?}", cl.jobs);
        Ok(())
    })
    .expect("db");
}

#[test]
fn failures_back_off_then_die_at_the_deadline_and_refusals_die_after_two() {
    let (_dir, db) = crate::store::temp_db();
    let cfg = Config::default();
    let retry = Outcome::Retry { status: Some(503), error: "503".into(), retry_after: None };
    db.call_blocking(|c| {
        add(c, &hook(member(), None, &["message"]), 1)?;
        queue_n(c, 2)?;
        let job = claim(c, caps(8, 1), 0, 1000, 20)?.jobs.remove(0);
        assert_eq!(settle(c, &job, &retry, &cfg, 30, 1.0)?, Settled::RetryAt(5030), "the first step, full jitter at 1");
        let job = claim(c, caps(8, 1), 0, 1000, 31)?.jobs.remove(0);
        assert_eq!(job.delivery, 2, "a failed delivery does not hold back the next one");
        let refused = Outcome::Refused { status: 404, error: "404".into() };
        assert_eq!(settle(c, &job, &refused, &cfg, 40, 0.0)?, Settled::RetryAt(140), "jitter 0: the 100 ms floor");
        let job = claim(c, caps(8, 1), 0, 1000, 140)?.jobs.remove(0);
        assert_eq!(job.delivery, 2);
        assert_eq!(
            settle(c, &job, &refused, &cfg, 150, 0.5)?,
            Settled::Dead,
            "a refusal is final at the second attempt"
        );
        // 429 with Retry-After is honoured; a Retry-After shorter than the schedule is not.
        let job = claim(c, caps(8, 1), 0, 1000, 5030)?.jobs.remove(0);
        let later =
            Outcome::Retry { status: Some(429), error: "429".into(), retry_after: Some(Duration::from_secs(60)) };
        assert_eq!(settle(c, &job, &later, &cfg, 5040, 0.5)?, Settled::RetryAt(65_040));
        let job = claim(c, caps(8, 1), 0, 1000, 65_040)?.jobs.remove(0);
        let soon = Outcome::Retry { status: Some(429), error: "429".into(), retry_after: Some(Duration::from_secs(1)) };
        assert_eq!(settle(c, &job, &soon, &cfg, 65_050, 1.0)?, Settled::RetryAt(65_050 + 120_000), "the third step");
        // A retry past the deadline is made at the deadline, the last attempt; failing then, it is dead.
        let job = claim(c, caps(8, 1), 0, 1000, 185_050)?.jobs.remove(0);
        let beyond = Outcome::Retry {
            status: Some(503),
            error: "503".into(),
            retry_after: Some(Duration::from_secs(72 * 3600)),
        };
        let deadline = 10 + 48 * H;
        assert_eq!(settle(c, &job, &beyond, &cfg, 185_060, 0.5)?, Settled::RetryAt(deadline), "one attempt, not dead");
        let job = claim(c, caps(8, 1), 0, 1000, deadline)?.jobs.remove(0);
        assert_eq!(settle(c, &job, &beyond, &cfg, deadline, 0.5)?, Settled::Dead);
        let d = delivery(c, Visible::All, 1)?.expect("row");
        assert_eq!((d.status, d.attempts, d.last_status), (DeliveryStatus::Dead, 5, Some(503)));
        Ok(())
    })
    .expect("db");
}

#[test]
fn gone_disables_and_so_does_failing_for_a_day_with_ten_attempts_and_enable_resumes() {
    let (_dir, db) = crate::store::temp_db();
    let cfg = Config::default();
    let down = Outcome::Retry { status: None, error: "could not connect".into(), retry_after: None };
    db.call_blocking(|c| {
        let (w, _) = add(c, &hook(member(), None, &["message"]), 1)?;
        queue_n(c, 1)?;
        // Nine failures over 30 hours: still enabled (too few attempts); the tenth disables it.
        let mut now = 20;
        for i in 0..10 {
            let job = claim(c, caps(8, 1), 0, 1000, now)?.jobs.remove(0);
            let settled = settle(c, &job, &down, &cfg, now, 0.0)?;
            if i < 9 {
                assert!(matches!(settled, Settled::RetryAt(_)), "attempt {i}: {settled:?}");
            } else {
                assert_eq!(settled, Settled::Disabled);
            }
            now += 3 * H + 1;
            c.execute("UPDATE webhook_deliveries SET next_attempt_at = ?1", [now as i64])?;
        }
        let info = get(c, Visible::All, w)?.expect("webhook");
        assert!(!info.enabled);
        assert!(info.disabled_reason.as_deref().unwrap_or("").contains("10 attempts"), "{info:?}");
        assert_eq!(claim(c, caps(8, 1), 0, 1000, now)?.jobs.len(), 0, "a disabled endpoint gets no attempt");
        let kinds: Vec<String> = c
            .prepare("SELECT kind FROM events WHERE kind = 'webhook'")?
            .query_map([], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        assert_eq!(kinds.len(), 1, "its owner is told");
        set_enabled(c, Visible::All, w, true, None, now)?;
        let job = claim(c, caps(8, 1), 0, 1000, now)?.jobs.remove(0);
        assert_eq!(settle(c, &job, &Outcome::Gone, &cfg, now, 0.0)?, Settled::Disabled);
        let info = get(c, Visible::All, w)?.expect("webhook");
        assert_eq!(info.disabled_reason.as_deref(), Some("it answered 410 Gone"));
        assert_eq!(info.deliveries.pending, 1, "the delivery waits for the endpoint to be enabled");
        Ok(())
    })
    .expect("db");
}

#[test]
fn a_rotation_signs_with_both_secrets_until_the_overlap_ends() {
    let (_dir, db) = crate::store::temp_db();
    db.call_blocking(|c| {
        let (w, old) = add(c, &hook(member(), None, &["message"]), 1)?;
        let (new, until) = rotate(c, Visible::All, w, Duration::from_secs(3600), 10)?.expect("rotated");
        assert_eq!(until, 10 + H);
        assert!(rotate(c, Visible::OwnedBy(session()), w, Duration::from_secs(1), 10)?.is_none(), "not the session's");
        queue_n(c, 2)?;
        let job = claim(c, caps(8, 1), 0, 1000, 20)?.jobs.remove(0);
        assert_eq!(job.secrets, vec![new.clone(), old]);
        settle(c, &job, &Outcome::Delivered { status: 200, slow: false }, &Config::default(), 21, 0.0)?;
        assert_eq!(maintain(c, 10 + H)?, (0, 1), "the previous secret is forgotten when the overlap ends");
        let job = claim(c, caps(8, 1), 0, 1000, 10 + H)?.jobs.remove(0);
        assert_eq!(job.secrets, vec![new]);
        Ok(())
    })
    .expect("db");
}

#[test]
fn a_second_rotation_keeps_the_first_secret_signing_until_its_own_end() {
    let (_dir, db) = crate::store::temp_db();
    db.call_blocking(|c| {
        let (w, s0) = add(c, &hook(member(), None, &["message"]), 1)?;
        let (s1, _) = rotate(c, Visible::All, w, Duration::from_secs(3600), 10)?.expect("rotated");
        let (s2, _) = rotate(c, Visible::All, w, Duration::from_secs(3600), 20)?.expect("rotated");
        queue_n(c, 1)?;
        let job = claim(c, caps(8, 1), 0, 1000, 30)?.jobs.remove(0);
        assert_eq!(job.secrets, vec![s2, s1.clone(), s0], "newest first; the first secret is still within its hour");
        assert_eq!(maintain(c, 10 + H)?.1, 1, "the first secret's hour ends first");
        Ok(())
    })
    .expect("db");
}

#[test]
fn the_janitor_prunes_delivered_then_dead_rows_and_never_unread_messages() {
    let (_dir, db) = crate::store::temp_db();
    let day = 24 * H;
    db.call_blocking(|c| {
        c.execute(
            "INSERT INTO inbox (id, mesh_id, recipient, message_id, sender, sender_name, client_message_id, target, raw,
                 status, sent_at, received_at, body) VALUES (100, 'm', 'r', 'm100', 's', 's', 'c', 't', '{}', 'ready', 1, 1, 'x')",
            [],
        )?;
        add(c, &hook(member(), None, &["message"]), 1)?;
        queue_n(c, 3)?;
        c.execute("UPDATE webhook_deliveries SET status = 'delivered', delivered_at = 1 WHERE id = 1", [])?;
        c.execute("UPDATE webhook_deliveries SET status = 'dead', last_attempt_at = 1 WHERE id = 2", [])?;
        // Pending past its deadline: dead, kept.
        assert_eq!(maintain(c, 49 * H)?.0, 1);
        let swept = crate::retention::sweep(c, &crate::retention::DaemonConfig::default(), 8 * day)?;
        assert_eq!(swept.webhook_deliveries, 1, "the delivered row, after 7 days");
        let left: Vec<i64> = c.prepare("SELECT id FROM webhook_deliveries ORDER BY id")?.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?;
        assert_eq!(left, vec![2, 3], "dead rows stay for their retention");
        let swept = crate::retention::sweep(c, &crate::retention::DaemonConfig::default(), 32 * day)?;
        assert_eq!(swept.webhook_deliveries, 2);
        let unread: i64 = c.query_row("SELECT COUNT(*) FROM inbox WHERE id = 100", [], |r| r.get(0))?;
        assert_eq!(unread, 1, "an unread message is never pruned");
        Ok(())
    })
    .expect("db");
}

#[test]
fn redeliver_makes_dead_rows_due_with_a_new_deadline() {
    let (_dir, db) = crate::store::temp_db();
    db.call_blocking(|c| {
        let (w, _) = add(c, &hook(member(), None, &["message"]), 1)?;
        queue_n(c, 2)?;
        assert_eq!(maintain(c, 49 * H)?.0, 2);
        assert_eq!(redeliver(c, Redeliver::AllDead(w), 50 * H, Duration::from_secs(3600))?, 2);
        let d = delivery(c, Visible::All, 1)?.expect("row");
        assert_eq!((d.status, d.attempts, d.deadline), (DeliveryStatus::Pending, 0, 51 * H));
        let job = claim(c, caps(8, 1), 0, 1000, 50 * H)?.jobs.remove(0);
        assert_eq!(job.delivery, 1);
        // Redelivering one that is being attempted does not send it a second time at once.
        assert_eq!(redeliver(c, Redeliver::One(1), 50 * H + 1, Duration::from_secs(3600))?, 1);
        assert!(claim(c, caps(8, 1), 0, 1000, 50 * H + 2)?.jobs.is_empty(), "still in flight");
        assert_eq!(
            settle(c, &job, &Outcome::Delivered { status: 200, slow: false }, &Config::default(), 50 * H + 3, 0.5)?,
            Settled::Delivered
        );
        Ok(())
    })
    .expect("db");
}

#[test]
fn urls_are_checked() {
    let ok = |u: &str| check_url(u, false, &[], &[7777]).map(|u| u.to_string());
    assert!(ok("https://hooks.example.com/x?token=1").is_ok());
    assert!(ok("http://127.0.0.1:8080/hook").is_ok());
    assert!(ok("http://localhost:8080/hook").is_ok());
    assert!(ok("http://[::1]:8080/hook").is_ok());
    assert!(matches!(check_url("http://example.com/", false, &[], &[]), Err(UrlError::InsecureHttp(_))));
    assert!(check_url("http://example.com/", true, &[], &[]).is_ok());
    assert!(matches!(ok("ftp://example.com/"), Err(UrlError::Scheme(_))));
    assert!(matches!(ok("https://user:pw@example.com/"), Err(UrlError::Credentials)));
    assert!(matches!(ok("not a url"), Err(UrlError::Invalid(..))));
    assert!(matches!(ok("http://127.0.0.1:0/"), Err(UrlError::PortZero)));
    assert_eq!(
        ok("https://example.com/x#part").ok().as_deref(),
        Some("https://example.com/x"),
        "a fragment is never sent"
    );
    assert!(matches!(ok("http://127.0.0.1:7777/"), Err(UrlError::OwnBroker(_))));
    let resolved = ["127.0.0.1:0".parse().expect("addr")];
    assert!(matches!(check_url("https://me.example:7777/", false, &resolved, &[7777]), Err(UrlError::OwnBroker(_))));
    // The broker stays refused whatever the flag and however the address is written.
    for url in
        ["http://[::ffff:127.0.0.1]:7777/", "http://localhost.:7777/", "http://0.0.0.0:7777/", "http://[::]:7777/"]
    {
        assert!(matches!(check_url(url, true, &[], &[7777]), Err(UrlError::OwnBroker(_))), "{url}");
    }
    let mapped = ["[::ffff:127.0.0.1]:0".parse().expect("addr")];
    assert!(matches!(check_url("https://me.example:7777/", true, &mapped, &[7777]), Err(UrlError::OwnBroker(_))));
    assert!(ok("http://localhost.:8080/").is_ok(), "localhost with its final dot is this machine");
    assert!(
        matches!(ok("http://foo.localhost:8080/"), Err(UrlError::InsecureHttp(_))),
        "a name the resolver answers for"
    );
}
