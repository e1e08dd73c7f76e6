//! The outbox drain of one link: claims this identity's due rows, sends them on this link's socket
//! only, and records each answer. It keeps at most [`WINDOW`] sends unanswered; it wakes on new rows,
//! on answers, and on a timer for the next row whose backoff ends. When the link goes down, the rows it
//! still had in flight go back to pending at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mesh_ipc::api::OutboxStatus;
use mesh_proto::wire::{Accepted, ClientFrame, ErrorCode, ErrorFrame, SendMessage};
use mesh_proto::{MeshId, PublicKey};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use mesh_broker::sqlite::Db;

use crate::outbox;

/// Sends in flight per connection.
pub const WINDOW: usize = 64;

/// The broker's answer to one `send`, routed here by the link's reader.
#[derive(Debug)]
pub enum Reply {
    Accepted(Accepted),
    Error(ErrorFrame),
}

/// One link's drain: which connection it serves and how large a frame its broker accepts.
pub struct Drain {
    pub db: Db,
    pub changed: Arc<crate::events::Changed>,
    pub mesh: MeshId,
    pub sender: PublicKey,
    /// From the broker's `welcome`: a send larger than this can never be accepted.
    pub max_frame_bytes: usize,
}

/// The drain's side of the link.
pub struct Channels {
    pub out: mpsc::Sender<String>,
    pub replies: mpsc::UnboundedReceiver<Reply>,
    pub wake: Arc<Notify>,
    pub stop: CancellationToken,
}

/// A send waiting for its answer.
struct InFlight {
    row: i64,
    sent: Instant,
}

impl Drain {
    pub async fn run(self, mut ch: Channels) {
        let Drain { db, changed, mesh, sender, max_frame_bytes } = self;
        let lease = Duration::from_millis(outbox::LEASE_MS);
        let mut inflight: HashMap<u64, InFlight> = HashMap::new();
        let mut next_request: u64 = 1;
        'drain: loop {
            // An answer that never came (the broker lost the request, or answered without its id) must
            // not hold a window slot forever: after the lease the sweeper owns the row again.
            inflight.retain(|id, f| {
                let keep = f.sent.elapsed() < lease;
                if !keep {
                    tracing::warn!(request = id, row = f.row, "no answer within the lease; the row will be sent again");
                }
                keep
            });
            let mut due = None;
            if inflight.len() < WINDOW {
                let room = WINDOW - inflight.len();
                let claimed = db
                    .call(move |c| {
                        let buried = outbox::bury(c, &mesh, &sender, now_ms())?;
                        Ok((buried, outbox::claim(c, &mesh, &sender, room, now_ms())?))
                    })
                    .await;
                match claimed {
                    Ok((buried, rows)) => {
                        if buried > 0 {
                            changed.bump();
                        }
                        let mut rows = rows.into_iter();
                        while let Some(row) = rows.next() {
                            let id = next_request;
                            next_request += 1;
                            let frame = ClientFrame::Send(SendMessage {
                                id,
                                client_message_id: row.client_message_id,
                                to: row.target,
                                nonce: row.nonce,
                                ciphertext: row.ciphertext,
                                sig: row.sig,
                                ttl_ms: Some(row.expires_at.saturating_sub(now_ms()).max(1)),
                            })
                            .to_json();
                            if frame.len() > max_frame_bytes {
                                let why = format!(
                                    "too large: {} bytes on the wire, this broker accepts at most {max_frame_bytes}",
                                    frame.len()
                                );
                                let row_id = row.id;
                                let dead = db
                                    .call(move |c| {
                                        outbox::mark_failed(c, row_id, &why, true, None, true, now_ms())?;
                                        outbox::emit_state(c, row_id, now_ms())
                                    })
                                    .await;
                                if let Err(e) = dead {
                                    tracing::error!(error = %mesh_proto::error::chain(&e), "marking an oversized row dead");
                                }
                                changed.bump();
                                continue;
                            }
                            inflight.insert(id, InFlight { row: row.id, sent: Instant::now() });
                            let sent = tokio::select! {
                                sent = ch.out.send(frame) => sent.is_ok(),
                                () = ch.stop.cancelled() => false,
                            };
                            if !sent {
                                // The connection is going: what was claimed but not written goes back now.
                                let unsent: Vec<i64> = rows.map(|r| r.id).collect();
                                release(&db, unsent).await;
                                break 'drain;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %mesh_proto::error::chain(&e), "claiming outbox rows; retrying in 1 s");
                        due = Some(now_ms() + 1000);
                    }
                }
                if due.is_none() && inflight.len() < WINDOW {
                    due = db.call(move |c| outbox::next_due(c, &mesh, &sender)).await.ok().flatten();
                }
            }
            let mut sleep = due.map(|t| Duration::from_millis(t.saturating_sub(now_ms()).max(1)));
            if let Some(oldest) = inflight.values().map(|f| f.sent).min() {
                let lapse = (oldest + lease).saturating_duration_since(Instant::now()) + Duration::from_millis(1);
                sleep = Some(sleep.map_or(lapse, |s| s.min(lapse)));
            }
            tokio::select! {
                () = ch.stop.cancelled() => break,
                () = ch.wake.notified() => {}
                reply = ch.replies.recv() => match reply {
                    Some(reply) => {
                        let mut batch = vec![reply];
                        while let Ok(more) = ch.replies.try_recv() {
                            batch.push(more);
                        }
                        record(&db, &mut inflight, batch).await;
                        changed.bump();
                    }
                    None => break,
                },
                () = sleep_opt(sleep) => {}
            }
        }
        let orphaned: Vec<i64> = inflight.into_values().map(|f| f.row).collect();
        if !orphaned.is_empty() {
            tracing::info!(rows = orphaned.len(), "connection ended with sends unanswered; back to pending");
        }
        release(&db, orphaned).await;
    }
}

async fn release(db: &Db, rows: Vec<i64>) {
    if rows.is_empty() {
        return;
    }
    if let Err(e) = db.call(move |c| outbox::release(c, &rows)).await {
        tracing::error!(error = %mesh_proto::error::chain(&e), "releasing inflight rows; their leases will return them");
    }
}

async fn record(db: &Db, inflight: &mut HashMap<u64, InFlight>, replies: Vec<Reply>) {
    let mut updates = Vec::with_capacity(replies.len());
    for reply in replies {
        let id = match &reply {
            Reply::Accepted(a) => a.id,
            Reply::Error(e) => e.id.unwrap_or_default(),
        };
        match inflight.remove(&id) {
            Some(f) => updates.push((f.row, reply)),
            None => tracing::warn!(request = id, "answer for a request not in flight; ignored"),
        }
    }
    let result = db
        .call(move |c| {
            let now = now_ms();
            let tx = c.transaction()?;
            for (row, reply) in updates {
                match reply {
                    Reply::Accepted(a) => {
                        outbox::mark_done(&tx, row, &a.message_id, a.recipients)?;
                        outbox::emit_state(&tx, row, now)?;
                    }
                    Reply::Error(e) => {
                        // Being told to slow down is not a failed attempt: it never uses up the cap.
                        let counts = e.code != ErrorCode::RateLimited;
                        let status =
                            outbox::mark_failed(&tx, row, &e.to_string(), e.permanent, e.retry_after_ms, counts, now)?;
                        tracing::info!(row, code = e.code.as_str(), status = status.as_str(), "send refused");
                        if status == OutboxStatus::Dead {
                            outbox::emit_state(&tx, row, now)?;
                        }
                    }
                }
            }
            tx.commit()
        })
        .await;
    if let Err(e) = result {
        tracing::error!(error = %mesh_proto::error::chain(&e), "recording broker answers; the rows' leases will return them");
    }
}

async fn sleep_opt(d: Option<Duration>) {
    match d {
        Some(d) => tokio::time::sleep(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! The drain against a fake broker: the test reads what the drain writes to the socket and answers
    //! as a broker would. Time is tokio's paused clock, so backoffs are exact and instant.

    use std::time::Duration;

    use mesh_ipc::api::{OutboxStatus, TargetInfo, TargetKind};
    use mesh_proto::wire::{Accepted, ErrorCode, ErrorFrame};
    use mesh_proto::{Identity, Target};

    use super::*;
    use crate::clock;

    struct FakeBroker {
        db: Db,
        me: Identity,
        out: mpsc::Receiver<String>,
        replies: mpsc::UnboundedSender<Reply>,
        wake: Arc<Notify>,
        stop: CancellationToken,
        task: tokio::task::JoinHandle<()>,
        _dir: tempfile::TempDir,
    }

    fn row(cmid: &str, sender: &Identity, to: &Identity) -> outbox::NewRow {
        outbox::NewRow {
            client_message_id: cmid.into(),
            fingerprint: "fp".into(),
            mesh_id: MeshId([9; 16]),
            sender: sender.key(),
            session: None,
            target: TargetInfo {
                kind: TargetKind::Direct,
                label: "x".into(),
                address: to.key().to_string(),
                name: None,
            },
            body: cmid.into(),
            nonce: vec![0; 24],
            ciphertext: vec![1; 32],
            sig: sender.sign("t", &[cmid.as_bytes()]),
        }
    }

    impl FakeBroker {
        fn start() -> FakeBroker {
            let dir = tempfile::tempdir().expect("tempdir");
            let db = crate::store::open(&dir.path().join("d.db")).expect("db");
            let (out_tx, out) = mpsc::channel(1024);
            let (replies, reply_rx) = mpsc::unbounded_channel();
            let (wake, stop) = (Arc::new(Notify::new()), CancellationToken::new());
            let (mesh, me) = (MeshId([9; 16]), Identity::generate());
            let drain = Drain {
                db: db.clone(),
                changed: crate::events::Changed::new(),
                mesh,
                sender: me.key(),
                max_frame_bytes: 4096,
            };
            let task = tokio::spawn(drain.run(Channels {
                out: out_tx,
                replies: reply_rx,
                wake: wake.clone(),
                stop: stop.clone(),
            }));
            FakeBroker { db, me, out, replies, wake, stop, task, _dir: dir }
        }

        fn insert_from(&self, cmid: &str, sender: &Identity) -> i64 {
            let r = row(cmid, sender, &Identity::generate());
            let id = self.db.call_blocking(|c| outbox::insert(c, &r, clock::now_ms())).expect("db").expect("new");
            self.wake.notify_one();
            id
        }

        fn insert(&self, cmid: &str) -> i64 {
            let me = self.me.clone();
            self.insert_from(cmid, &me)
        }

        async fn next_send(&mut self) -> SendMessage {
            let text = tokio::time::timeout(Duration::from_secs(3600), self.out.recv())
                .await
                .expect("a send within the hour")
                .expect("drain running");
            match serde_json::from_str::<ClientFrame>(&text).expect("a client frame") {
                ClientFrame::Send(s) => s,
                other => panic!("expected send, got {other:?}"),
            }
        }

        async fn no_send_for(&mut self, d: Duration) {
            if let Ok(Some(text)) = tokio::time::timeout(d, self.out.recv()).await {
                panic!("unexpected frame: {text}");
            }
        }

        fn accept(&self, s: &SendMessage) {
            let a = Accepted {
                id: s.id,
                message_id: format!("m-{}", s.client_message_id),
                duplicate: false,
                recipients: 1,
            };
            self.replies.send(Reply::Accepted(a)).expect("drain listening");
        }

        fn refuse(&self, s: &SendMessage, code: ErrorCode, retry_after_ms: Option<u64>) {
            let e = ErrorFrame { retry_after_ms, ..ErrorFrame::new(code, "fake refusal").with_id(Some(s.id)) };
            self.replies.send(Reply::Error(e)).expect("drain listening");
        }

        /// Polls the row until it is in `want` (the drain records answers asynchronously).
        async fn status_becomes(&self, id: i64, want: OutboxStatus) -> mesh_ipc::api::OutboxEntry {
            for _ in 0..1000 {
                let e = self.db.call(move |c| outbox::entry(c, id)).await.expect("db").expect("row");
                if e.status == want {
                    return e;
                }
                tokio::task::yield_now().await;
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            panic!("row {id} never became {want:?}");
        }
    }

    #[tokio::test(start_paused = true)]
    async fn accepted_rows_are_done_and_sent_exactly_as_stored() {
        let mut b = FakeBroker::start();
        let id = b.insert("c-1");
        let s = b.next_send().await;
        assert_eq!(s.client_message_id, "c-1");
        assert_eq!((s.nonce.len(), s.ciphertext.len()), (24, 32));
        assert!(matches!(s.to, Target::Key(_)));
        b.accept(&s);
        let e = b.status_becomes(id, OutboxStatus::Done).await;
        assert_eq!(e.message_id.as_deref(), Some("m-c-1"));
        assert_eq!(e.attempts, 1);
        b.no_send_for(Duration::from_secs(600)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_permanent_error_kills_the_row_at_once() {
        let mut b = FakeBroker::start();
        let id = b.insert("c-1");
        let s = b.next_send().await;
        b.refuse(&s, ErrorCode::RecipientUnknown, None);
        let e = b.status_becomes(id, OutboxStatus::Dead).await;
        assert!(e.last_error.expect("reason").starts_with("recipient_unknown"));
        b.no_send_for(Duration::from_secs(3600)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_transient_error_is_retried_after_a_jittered_backoff() {
        let mut b = FakeBroker::start();
        let id = b.insert("c-1");
        let first = b.next_send().await;
        b.refuse(&first, ErrorCode::Internal, None);
        b.status_becomes(id, OutboxStatus::Pending).await;
        let t0 = Instant::now();
        let again = b.next_send().await;
        let waited = t0.elapsed();
        assert_eq!(again.client_message_id, "c-1", "the same row, resent");
        assert_eq!((&again.nonce, &again.ciphertext), (&first.nonce, &first.ciphertext), "byte-identical resend");
        assert!(waited >= Duration::from_millis(240) && waited <= Duration::from_millis(520), "{waited:?}");
        b.accept(&again);
        assert_eq!(b.status_becomes(id, OutboxStatus::Done).await.attempts, 2);
    }

    #[tokio::test(start_paused = true)]
    async fn rate_limited_rows_wait_as_told_and_keep_their_attempts() {
        let mut b = FakeBroker::start();
        let id = b.insert("c-1");
        let s = b.next_send().await;
        b.refuse(&s, ErrorCode::RateLimited, Some(5_000));
        b.status_becomes(id, OutboxStatus::Pending).await;
        let t0 = Instant::now();
        let again = b.next_send().await;
        assert!(t0.elapsed() >= Duration::from_millis(4_990), "{:?}", t0.elapsed());
        b.accept(&again);
        assert_eq!(b.status_becomes(id, OutboxStatus::Done).await.attempts, 1, "being rate limited is not an attempt");
    }

    #[tokio::test(start_paused = true)]
    async fn transient_failures_stop_at_the_attempt_cap() {
        let mut b = FakeBroker::start();
        let id = b.insert("c-1");
        for _ in 0..outbox::MAX_ATTEMPTS {
            let s = b.next_send().await;
            b.refuse(&s, ErrorCode::Unavailable, None);
        }
        let e = b.status_becomes(id, OutboxStatus::Dead).await;
        assert_eq!(e.attempts, outbox::MAX_ATTEMPTS);
        assert!(e.last_error.expect("reason").contains("gave up"));
        b.no_send_for(Duration::from_secs(3600)).await;
    }

    #[tokio::test(start_paused = true)]
    async fn rows_in_flight_when_the_link_drops_go_back_to_pending() {
        let mut b = FakeBroker::start();
        let id = b.insert("c-1");
        let _unanswered = b.next_send().await;
        b.status_becomes(id, OutboxStatus::Inflight).await;
        b.stop.cancel();
        b.task.await.expect("drain ends");
        let e = b.db.call(move |c| outbox::entry(c, id)).await.expect("db").expect("row");
        assert_eq!(e.status, OutboxStatus::Pending);
    }

    #[tokio::test(start_paused = true)]
    async fn another_identity_s_rows_never_go_out_on_this_connection() {
        let mut b = FakeBroker::start();
        let session = Identity::generate();
        let theirs = b.insert_from("session-row", &session);
        let mine = b.insert("member-row");
        let s = b.next_send().await;
        assert_eq!(s.client_message_id, "member-row");
        b.accept(&s);
        b.status_becomes(mine, OutboxStatus::Done).await;
        b.no_send_for(Duration::from_secs(3600)).await;
        let e = b.db.call(move |c| outbox::entry(c, theirs)).await.expect("db").expect("row");
        assert_eq!(e.status, OutboxStatus::Pending, "waits for its own connection");
    }

    #[tokio::test(start_paused = true)]
    async fn at_most_a_window_of_sends_is_unanswered() {
        let mut b = FakeBroker::start();
        for i in 0..(WINDOW + 10) {
            b.insert(&format!("c-{i}"));
        }
        let mut sent = Vec::new();
        for _ in 0..WINDOW {
            sent.push(b.next_send().await);
        }
        b.no_send_for(Duration::from_secs(10)).await;
        b.accept(&sent[0]);
        let next = b.next_send().await;
        assert_eq!(next.client_message_id, format!("c-{WINDOW}"), "oldest first, one more per answer");
    }

    #[tokio::test(start_paused = true)]
    async fn a_row_too_large_for_the_broker_dies_at_once_with_the_reason() {
        let mut b = FakeBroker::start();
        let r = outbox::NewRow { ciphertext: vec![7; 8000], ..row("huge", &b.me, &Identity::generate()) };
        let id = b.db.call_blocking(|c| outbox::insert(c, &r, clock::now_ms())).expect("db").expect("new");
        b.wake.notify_one();
        let small = b.insert("small");
        let s = b.next_send().await;
        assert_eq!(s.client_message_id, "small", "the oversized row never went out, and did not block the next");
        let e = b.status_becomes(id, OutboxStatus::Dead).await;
        assert!(e.last_error.expect("reason").contains("too large"));
        b.accept(&s);
        b.status_becomes(small, OutboxStatus::Done).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_never_answered_frees_its_window_slot_after_the_lease() {
        let mut b = FakeBroker::start();
        for i in 0..=WINDOW {
            b.insert(&format!("c-{i}"));
        }
        for _ in 0..WINDOW {
            b.next_send().await;
        }
        let t0 = Instant::now();
        let late = b.next_send().await;
        assert_eq!(late.client_message_id, format!("c-{WINDOW}"));
        assert!(t0.elapsed() >= Duration::from_millis(outbox::LEASE_MS), "{:?}", t0.elapsed());
    }
}
