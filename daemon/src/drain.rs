//! The outbound work of one link: this identity's due outbox rows, its pending read receipts and its
//! group joins and leaves, sent on this link's socket only, each answer recorded. At most [`WINDOW`]
//! requests are unanswered at a time; it wakes on new work, on answers, and on a timer for the next
//! row whose backoff ends. When the link goes down, whatever it still had in flight goes back to
//! pending at once.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use mesh_ipc::api::OutboxStatus;
use mesh_proto::wire::{
    Accepted, ClientFrame, EndSessionRequest, ErrorCode, ErrorFrame, GroupRequest, ReadReceipts, SendMessage,
};
use mesh_proto::{MeshId, PublicKey};
use tokio::sync::{Notify, mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::clock::now_ms;
use mesh_broker::sqlite::Db;

use crate::{groups, inbox, outbox, sessions};

/// Sends in flight per connection.
pub const WINDOW: usize = 64;

/// Read receipts sent in one request, at most.
const READ_BATCH: usize = 256;

/// The broker's answer to one request, routed here by the link's reader.
#[derive(Debug)]
pub enum Reply {
    Accepted(Accepted),
    Ok(u64),
    Error(ErrorFrame),
    /// The mesh's invites, answering an `invites` request.
    Invites(mesh_proto::wire::InvitesReply),
}

/// What a user's request over a link was answered with.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Answer {
    Ok,
    Invites(Vec<mesh_proto::wire::InviteInfo>),
}

impl Reply {
    fn id(&self) -> Option<u64> {
        match self {
            Reply::Accepted(a) => Some(a.id),
            Reply::Ok(id) => Some(*id),
            Reply::Error(e) => e.id,
            Reply::Invites(i) => Some(i.id),
        }
    }
}

/// One link's drain: which connection it serves and how large a frame its broker accepts.
pub struct Drain {
    pub db: Db,
    pub changed: Arc<crate::events::Changed>,
    pub mesh: MeshId,
    pub sender: PublicKey,
    /// From the broker's `welcome`: a send larger than this can never be accepted.
    pub max_frame_bytes: usize,
    /// The member's link also tells the broker which of the member's sessions ended.
    pub member_link: bool,
    /// Who sends on this link (the member or a session): a row sealed under a replaced mesh key is
    /// sealed again with it.
    pub identity: mesh_proto::Identity,
}

/// A request made for a user over this link (a rename): the frame, given its request id, and where
/// the broker's answer goes. When the connection ends first, `reply` is dropped.
pub struct LinkRequest {
    pub frame: Box<dyn FnOnce(u64) -> ClientFrame + Send>,
    pub reply: oneshot::Sender<Result<Answer, ErrorFrame>>,
}

/// Where a [`LinkRequest`]'s answer goes.
pub struct Responder(oneshot::Sender<Result<Answer, ErrorFrame>>);

impl std::fmt::Debug for Responder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Responder")
    }
}

/// The drain's side of the link.
pub struct Channels {
    pub out: mpsc::Sender<String>,
    pub replies: mpsc::UnboundedReceiver<Reply>,
    pub wake: Arc<Notify>,
    pub stop: CancellationToken,
    /// Requests made for users; shared by the link's successive connections.
    pub requests: Arc<tokio::sync::Mutex<mpsc::Receiver<LinkRequest>>>,
}

/// What a request in flight was for.
#[derive(Debug)]
enum Work {
    /// An outbox row.
    Send(i64),
    /// Read receipts for these inbox rows.
    Reads(Vec<i64>),
    /// Joining (`true`) or leaving a group.
    Group(String, bool),
    /// Telling the broker that this session of the member ended.
    EndSession(PublicKey),
    /// A user's request, answered to them.
    Request(Responder),
}

/// A request waiting for its answer.
struct InFlight {
    work: Work,
    sent: Instant,
}

/// Everything claimed in one step, in the order it goes out.
struct Claimed {
    buried: usize,
    rows: Vec<outbox::Claimed>,
    reads: Vec<(i64, String)>,
    groups: Vec<(String, bool)>,
    ended: Vec<PublicKey>,
}

impl Drain {
    pub async fn run(self, mut ch: Channels) {
        let requests = ch.requests.clone();
        let mut requests = requests.lock().await;
        let lease = Duration::from_millis(outbox::LEASE_MS);
        let mut inflight: HashMap<u64, InFlight> = HashMap::new();
        let mut next_request: u64 = 1;
        'drain: loop {
            // An answer that never came (the broker lost the request, or answered without its id) must
            // not hold a window slot forever: after the lease, the sweeper owns the row again.
            let lapsed: Vec<u64> =
                inflight.iter().filter(|(_, f)| f.sent.elapsed() >= lease).map(|(id, _)| *id).collect();
            for id in lapsed {
                if let Some(f) = inflight.remove(&id) {
                    tracing::warn!(request = id, work = ?f.work, "no answer within the lease; it will be sent again");
                    self.release(vec![f.work]).await;
                }
            }
            let mut due = None;
            if inflight.len() < WINDOW {
                match self.claim(WINDOW - inflight.len(), &inflight).await {
                    Ok(claimed) => {
                        if claimed.buried > 0 {
                            self.changed.bump();
                        }
                        let mut frames: Vec<(Work, String)> = Vec::new();
                        for row in claimed.rows {
                            let frame = send_frame(next_request, row.clone());
                            if frame.len() > self.max_frame_bytes {
                                self.kill_oversized(row.id, frame.len()).await;
                                continue;
                            }
                            frames.push((Work::Send(row.id), frame));
                            next_request += 1;
                        }
                        if !claimed.reads.is_empty() {
                            let (ids, message_ids): (Vec<i64>, Vec<String>) = claimed.reads.into_iter().unzip();
                            let frame = ClientFrame::Read(ReadReceipts { id: next_request, message_ids }).to_json();
                            frames.push((Work::Reads(ids), frame));
                            next_request += 1;
                        }
                        for (group, join) in claimed.groups {
                            let req = GroupRequest { id: next_request, group: group.clone() };
                            let frame = if join { ClientFrame::JoinGroup(req) } else { ClientFrame::LeaveGroup(req) };
                            frames.push((Work::Group(group, join), frame.to_json()));
                            next_request += 1;
                        }
                        for key in claimed.ended {
                            let frame = ClientFrame::EndSession(EndSessionRequest { id: next_request, key });
                            frames.push((Work::EndSession(key), frame.to_json()));
                            next_request += 1;
                        }
                        let first = next_request - frames.len() as u64;
                        let mut frames = frames.into_iter().enumerate();
                        while let Some((i, (work, frame))) = frames.next() {
                            inflight.insert(first + i as u64, InFlight { work, sent: Instant::now() });
                            let sent = tokio::select! {
                                sent = ch.out.send(frame) => sent.is_ok(),
                                () = ch.stop.cancelled() => false,
                            };
                            if !sent {
                                // The connection is going: what was claimed but not written goes back now.
                                self.release(frames.map(|(_, (w, _))| w).collect()).await;
                                break 'drain;
                            }
                        }
                    }
                    Err(e) => {
                        tracing::error!(error = %mesh_proto::error::chain(&e), "claiming outbound work; retrying in 1 s");
                        due = Some(now_ms() + 1000);
                    }
                }
                if due.is_none() && inflight.len() < WINDOW {
                    let (mesh, sender) = (self.mesh, self.sender);
                    due = self.db.call(move |c| outbox::next_due(c, &mesh, &sender)).await.ok().flatten();
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
                Some(request) = requests.recv() => {
                    let id = next_request;
                    next_request += 1;
                    let frame = (request.frame)(id).to_json();
                    inflight.insert(id, InFlight { work: Work::Request(Responder(request.reply)), sent: Instant::now() });
                    let sent = tokio::select! {
                        sent = ch.out.send(frame) => sent.is_ok(),
                        () = ch.stop.cancelled() => false,
                    };
                    if !sent {
                        break;
                    }
                },
                reply = ch.replies.recv() => match reply {
                    Some(reply) => {
                        let mut batch = vec![reply];
                        while let Ok(more) = ch.replies.try_recv() {
                            batch.push(more);
                        }
                        self.record(&mut inflight, batch).await;
                        self.changed.bump();
                    }
                    None => break,
                },
                () = sleep_opt(sleep) => {}
            }
        }
        // Answers read before the connection ended count: a broker that answers and then closes (a
        // member who just left the mesh) did what it said.
        let mut answered = Vec::new();
        while let Ok(more) = ch.replies.try_recv() {
            answered.push(more);
        }
        if !answered.is_empty() {
            self.record(&mut inflight, answered).await;
        }
        if !inflight.is_empty() {
            tracing::info!(requests = inflight.len(), "connection ended with requests unanswered; back to pending");
        }
        self.release(inflight.into_values().map(|f| f.work).collect()).await;
    }

    /// Claims due outbox rows, then (if none is in flight) a batch of read receipts, then group changes.
    async fn claim(
        &self,
        room: usize,
        inflight: &HashMap<u64, InFlight>,
    ) -> Result<Claimed, mesh_broker::sqlite::DbError> {
        let (mesh, sender) = (self.mesh, self.sender);
        let reads_in_flight = inflight.values().any(|f| matches!(f.work, Work::Reads(_)));
        let groups_in_flight: Vec<String> = inflight
            .values()
            .filter_map(|f| if let Work::Group(g, _) = &f.work { Some(g.clone()) } else { None })
            .collect();
        let ends_in_flight: Vec<PublicKey> =
            inflight.values().filter_map(|f| if let Work::EndSession(k) = &f.work { Some(*k) } else { None }).collect();
        let member_link = self.member_link;
        let identity = self.identity.clone();
        self.db
            .call(move |c| {
                let now = now_ms();
                let buried = outbox::bury(c, &mesh, &sender, now)?;
                let rows = outbox::claim(c, &mesh, &identity, room, now)?;
                let mut left = room - rows.len();
                let reads = if left > 0 && !reads_in_flight {
                    left -= 1;
                    inbox::claim_reads(c, &mesh, &sender, READ_BATCH)?
                } else {
                    vec![]
                };
                let mut groups = groups::to_sync(c, &mesh, &sender)?;
                groups.retain(|(g, _)| !groups_in_flight.contains(g));
                groups.truncate(left);
                left -= groups.len();
                let mut ended = if member_link { sessions::ends_to_sync(c, &mesh)? } else { vec![] };
                ended.retain(|k| !ends_in_flight.contains(k));
                ended.truncate(left);
                Ok(Claimed { buried, rows, reads, groups, ended })
            })
            .await
    }

    async fn kill_oversized(&self, row: i64, size: usize) {
        let why = format!("too large: {size} bytes on the wire, this broker accepts at most {}", self.max_frame_bytes);
        let dead = self
            .db
            .call(move |c| {
                outbox::mark_failed(c, row, &why, true, None, true, now_ms())?;
                outbox::emit_state(c, row, now_ms())
            })
            .await;
        if let Err(e) = dead {
            tracing::error!(error = %mesh_proto::error::chain(&e), "marking an oversized row dead");
        }
        self.changed.bump();
    }

    /// Work that was claimed but will not be answered here: back to pending.
    async fn release(&self, work: Vec<Work>) {
        if work.is_empty() {
            return;
        }
        let result = self
            .db
            .call(move |c| {
                let tx = c.transaction()?;
                for w in work {
                    match w {
                        Work::Send(row) => outbox::release(&tx, &[row])?,
                        Work::Reads(ids) => inbox::release_reads(&tx, &ids)?,
                        // Their state is in the database already, or (a user's request) dropping
                        // the responder tells the user.
                        Work::Group(..) | Work::EndSession(_) | Work::Request(_) => {}
                    }
                }
                tx.commit()
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %mesh_proto::error::chain(&e), "releasing claimed work; leases and start-up will return it");
        }
    }

    async fn record(&self, inflight: &mut HashMap<u64, InFlight>, replies: Vec<Reply>) {
        let mut updates = Vec::with_capacity(replies.len());
        for reply in replies {
            let id = reply.id().unwrap_or_default();
            match inflight.remove(&id) {
                Some(InFlight { work: Work::Request(Responder(to)), .. }) => {
                    let _ = to.send(match reply {
                        Reply::Error(e) => Err(e),
                        Reply::Invites(i) => Ok(Answer::Invites(i.invites)),
                        Reply::Ok(_) | Reply::Accepted(_) => Ok(Answer::Ok),
                    });
                }
                Some(f) => updates.push((f.work, reply)),
                None => tracing::warn!(request = id, "answer for a request not in flight; ignored"),
            }
        }
        let (mesh, sender) = (self.mesh, self.sender);
        let result = self
            .db
            .call(move |c| {
                let now = now_ms();
                let tx = c.transaction()?;
                for (work, reply) in updates {
                    match (work, reply) {
                        (Work::Send(row), Reply::Accepted(a)) => {
                            outbox::mark_done(&tx, row, &a.message_id, a.recipients)?;
                            outbox::emit_state(&tx, row, now)?;
                        }
                        (Work::Send(row), Reply::Error(e)) if e.code == ErrorCode::StaleKey => {
                            // Sealed under a key the mesh has replaced: sealed again under the current
                            // one before the next attempt.
                            let newer = outbox::newer_key_held(&tx, row)?;
                            outbox::needs_reseal(&tx, row)?;
                            let why = if newer {
                                e.to_string()
                            } else {
                                format!("{e} (no newer mesh key here yet; an owner or admin gives one)")
                            };
                            // Never a failed attempt: without a newer key it waits (30 s at a time, up
                            // to its TTL) for the grant an owner or admin gives.
                            let retry = Some(if newer { 500 } else { 30_000 });
                            let status = outbox::mark_failed(&tx, row, &why, false, retry, false, now)?;
                            tracing::info!(row, newer, "send sealed under a replaced mesh key; sealing it again");
                            if status == OutboxStatus::Dead {
                                outbox::emit_state(&tx, row, now)?;
                            }
                        }
                        (Work::Send(row), Reply::Error(e)) => {
                            // Being told to slow down, or that the broker's storage is failing (a
                            // database outage of any length), is not a failed attempt: it never uses
                            // up the cap. A storage failure is tried again after a few seconds.
                            let counts = !matches!(e.code, ErrorCode::RateLimited | ErrorCode::Internal);
                            let retry_after = match e.code {
                                ErrorCode::Internal => Some(e.retry_after_ms.unwrap_or(0).max(outbox::STORAGE_RETRY_MS)),
                                _ => e.retry_after_ms,
                            };
                            let status =
                                outbox::mark_failed(&tx, row, &e.to_string(), e.permanent, retry_after, counts, now)?;
                            // The broker's storage failing is said by the row's last error and the
                            // broker's log; one line per row every few seconds would bury the log.
                            if e.code == ErrorCode::Internal && status == OutboxStatus::Pending {
                                tracing::debug!(row, code = e.code.as_str(), "send not stored by the broker; again soon");
                            } else {
                                tracing::info!(row, code = e.code.as_str(), status = status.as_str(), "send refused");
                            }
                            if status == OutboxStatus::Dead {
                                outbox::emit_state(&tx, row, now)?;
                            }
                        }
                        (Work::Reads(ids), Reply::Ok(_)) => inbox::reads_sent(&tx, &ids)?,
                        (Work::Reads(ids), reply) => {
                            tracing::warn!(?reply, "read receipts refused; will retry");
                            inbox::release_reads(&tx, &ids)?;
                        }
                        (Work::Group(g, join), Reply::Ok(_)) => groups::synced(&tx, &mesh, &sender, &g, join)?,
                        (Work::Group(g, join), Reply::Error(e)) if e.permanent => {
                            tracing::warn!(group = %g, code = e.code.as_str(), "the broker refused a group change; dropped");
                            groups::synced(&tx, &mesh, &sender, &g, join)?;
                        }
                        (Work::EndSession(key), Reply::Ok(_)) => sessions::end_synced(&tx, &key)?,
                        (Work::EndSession(key), Reply::Error(e)) if e.permanent => {
                            tracing::warn!(session = %key.short(), code = e.code.as_str(), "the broker refused a session end; dropped");
                            sessions::end_synced(&tx, &key)?;
                        }
                        (work, reply) => tracing::warn!(?work, ?reply, "unexpected answer; the work will be retried"),
                    }
                }
                tx.commit()
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %mesh_proto::error::chain(&e), "recording broker answers; leases will return the work");
        }
    }
}

fn send_frame(id: u64, row: outbox::Claimed) -> String {
    ClientFrame::Send(SendMessage {
        id,
        client_message_id: row.client_message_id,
        to: row.target,
        nonce: row.nonce,
        ciphertext: row.ciphertext,
        sig: row.sig,
        ttl_ms: Some(row.expires_at.saturating_sub(now_ms()).max(1)),
        key_epoch: row.key_epoch,
    })
    .to_json()
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
        requests: mpsc::Sender<LinkRequest>,
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
            key_epoch: None,
        }
    }

    impl FakeBroker {
        fn start() -> FakeBroker {
            let (dir, db) = crate::store::temp_db();
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
                member_link: true,
                identity: me.clone(),
            };
            let (requests, requests_rx) = mpsc::channel(8);
            let task = tokio::spawn(drain.run(Channels {
                out: out_tx,
                replies: reply_rx,
                wake: wake.clone(),
                stop: stop.clone(),
                requests: Arc::new(tokio::sync::Mutex::new(requests_rx)),
            }));
            FakeBroker { db, me, out, replies, wake, stop, task, requests, _dir: dir }
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
        b.refuse(&first, ErrorCode::Unavailable, None);
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
    async fn storage_failures_wait_and_never_use_up_the_attempts() {
        let mut b = FakeBroker::start();
        let id = b.insert("c-1");
        // Twice the cap: a database outage longer than 25 attempts would take.
        let mut refused_at: Option<Instant> = None;
        for _ in 0..outbox::MAX_ATTEMPTS * 2 {
            let s = b.next_send().await;
            if let Some(t) = refused_at {
                assert!(t.elapsed() >= Duration::from_millis(outbox::STORAGE_RETRY_MS - 10), "{:?}", t.elapsed());
            }
            b.refuse(&s, ErrorCode::Internal, None);
            refused_at = Some(Instant::now());
        }
        let s = b.next_send().await;
        b.accept(&s);
        assert_eq!(b.status_becomes(id, OutboxStatus::Done).await.attempts, 1, "a storage failure is not an attempt");
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
    async fn requests_never_answered_are_sent_again_after_the_lease_and_free_the_window() {
        let mut b = FakeBroker::start();
        for i in 0..=WINDOW {
            b.insert(&format!("c-{i}"));
        }
        for _ in 0..WINDOW {
            b.next_send().await;
        }
        b.no_send_for(Duration::from_millis(outbox::LEASE_MS - 1)).await;
        // The lapsed requests go back to pending and out again, oldest first, with their slots.
        let mut resent = Vec::new();
        for _ in 0..WINDOW {
            resent.push(b.next_send().await);
        }
        assert_eq!(resent[0].client_message_id, "c-0");
        for s in &resent {
            b.accept(s);
        }
        assert_eq!(b.next_send().await.client_message_id, format!("c-{WINDOW}"));
    }

    async fn next_frame(b: &mut FakeBroker) -> ClientFrame {
        let text = tokio::time::timeout(Duration::from_secs(3600), b.out.recv())
            .await
            .expect("a frame within the hour")
            .expect("drain running");
        serde_json::from_str(&text).expect("a client frame")
    }

    #[tokio::test(start_paused = true)]
    async fn a_user_request_goes_out_and_its_answer_comes_back_or_is_dropped_with_the_connection() {
        let mut b = FakeBroker::start();
        let ask = |name: &'static str| {
            let (reply, answer) = oneshot::channel();
            let frame =
                Box::new(move |id| ClientFrame::Rename(mesh_proto::wire::RenameRequest { id, name: name.into() }));
            (LinkRequest { frame, reply }, answer)
        };
        let (request, answer) = ask("bob");
        b.requests.send(request).await.expect("drain listening");
        let ClientFrame::Rename(r) = next_frame(&mut b).await else { panic!("expected a rename") };
        assert_eq!(r.name, "bob");
        b.replies.send(Reply::Ok(r.id)).expect("drain listening");
        assert_eq!(answer.await.expect("answered"), Ok(Answer::Ok));

        let (request, answer) = ask("carol");
        b.requests.send(request).await.expect("drain listening");
        let ClientFrame::Rename(r) = next_frame(&mut b).await else { panic!("expected a rename") };
        let refusal = ErrorFrame::new(ErrorCode::NameTaken, "taken").with_id(Some(r.id));
        b.replies.send(Reply::Error(refusal.clone())).expect("drain listening");
        assert_eq!(answer.await.expect("answered"), Err(refusal));

        // The connection ends before the answer: the user hears that it is gone, not silence.
        let (request, answer) = ask("dave");
        b.requests.send(request).await.expect("drain listening");
        let _ = next_frame(&mut b).await;
        b.stop.cancel();
        assert!(answer.await.is_err(), "the responder is dropped");
    }

    #[tokio::test(start_paused = true)]
    async fn the_member_link_tells_the_broker_which_sessions_ended_once() {
        let mut b = FakeBroker::start();
        let session = Identity::generate();
        let mesh = MeshId([9; 16]);
        b.db.call_blocking(|c| {
            c.execute(
                "INSERT INTO sessions (mesh_id, name, key, sign_seed, enc_secret, created_at, ended_at, end_synced)
                 VALUES (?1, 'gone', ?2, ?3, ?4, 1, 2, 0)",
                rusqlite::params![
                    mesh.to_string(),
                    session.key().to_string(),
                    session.sign_seed().as_slice(),
                    session.enc_secret().as_slice()
                ],
            )
        })
        .expect("ended session");
        b.wake.notify_one();
        let ClientFrame::EndSession(end) = next_frame(&mut b).await else { panic!("expected end_session") };
        assert_eq!(end.key, session.key());
        b.replies.send(Reply::Ok(end.id)).expect("drain listening");
        for _ in 0..1000 {
            let left = b.db.call(move |c| sessions::ends_to_sync(c, &mesh)).await.expect("db");
            if left.is_empty() {
                b.wake.notify_one();
                b.no_send_for(Duration::from_secs(600)).await;
                return;
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        panic!("the end was never recorded as told");
    }

    #[tokio::test(start_paused = true)]
    async fn a_broadcast_refused_for_a_replaced_key_goes_again_sealed_under_the_current_one() {
        use mesh_proto::crypto::GroupKey;
        use mesh_proto::message::{self, Content, SealKey};
        let mut b = FakeBroker::start();
        let mesh = MeshId([9; 16]);
        let (old, new) = (GroupKey::generate(), GroupKey::generate());
        // The mesh's key went from epoch 0 to 1 after the send was sealed under 0.
        let mesh_row = crate::meshes::MeshRow {
            id: mesh,
            name: "team".into(),
            broker_url: "ws://127.0.0.1:1".into(),
            role: mesh_proto::wire::Role::Member,
            group_key: old.clone(),
            key_epoch: 0,
            embedded: false,
            joined_at: 1,
            my_name: None,
            tls_pin: None,
        };
        let me = b.me.clone();
        let content = Content { body: "for everyone".into(), reply_to: None };
        let sealed = message::seal(&me, &mesh, "bc-1", &Target::All, SealKey::Group(&old), &content);
        let (new_key, writer) = (new.clone(), me.clone());
        let id =
            b.db.call_blocking(move |c| {
                crate::meshes::insert(c, &mesh_row)?;
                crate::keys::keep(c, &mesh, 1, &new_key, 5, 5)?;
                let broadcast = outbox::NewRow {
                    target: TargetInfo {
                        kind: TargetKind::Broadcast,
                        label: "*".into(),
                        address: "*".into(),
                        name: None,
                    },
                    body: "for everyone".into(),
                    nonce: sealed.nonce.clone(),
                    ciphertext: sealed.ciphertext.clone(),
                    sig: sealed.sig,
                    key_epoch: Some(0),
                    ..row("bc-1", &writer, &writer)
                };
                outbox::insert(c, &broadcast, clock::now_ms())
            })
            .expect("db")
            .expect("new");
        b.wake.notify_one();
        let first = b.next_send().await;
        assert_eq!(first.key_epoch, Some(0));
        b.refuse(&first, ErrorCode::StaleKey, None);
        let again = b.next_send().await;
        assert_eq!((again.client_message_id.as_str(), again.key_epoch), ("bc-1", Some(1)));
        assert_ne!(again.ciphertext, first.ciphertext, "sealed anew");
        // It opens with the new key only, signed by the sender over the new bytes.
        let env = mesh_proto::wire::Envelope {
            message_id: "m".into(),
            mesh_id: mesh,
            from: me.key(),
            from_member: me.key(),
            from_enc_key: me.enc_key(),
            from_enc_sig: me.public().enc_sig,
            from_name: "me".into(),
            to: Target::All,
            client_message_id: again.client_message_id.clone(),
            nonce: again.nonce.clone(),
            ciphertext: again.ciphertext.clone(),
            sig: again.sig,
            sent_at: 20,
            expires_at: 30,
        };
        let reader = Identity::generate();
        assert_eq!(message::open_with(&env, &reader, &[(1, new)]).expect("opens").0, content);
        assert!(message::open_with(&env, &reader, &[(0, old)]).is_err(), "not with the replaced key");
        b.accept(&again);
        let done = b.status_becomes(id, OutboxStatus::Done).await;
        assert_eq!(done.attempts, 1, "a refusal for a replaced key is not a failed attempt");
    }
}
