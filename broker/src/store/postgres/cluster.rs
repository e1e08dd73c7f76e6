//! Replicas of one PostgreSQL database, told about each other.
//!
//! - **Wake-ups, presence and supersedes** cross replicas as `NOTIFY mesh_broker`. Notes are
//!   coalesced by one task per replica (wake-ups deduplicated, several notes per payload, under
//!   PostgreSQL's 8000-byte limit): `NOTIFY` takes a lock at commit, so it is not sent per message.
//!   Payload: the sender's replica number on the first line, then one note per line:
//!   `w MESH KEY`, `k REPLICA CONN MESH KEY`, `p MESH EXCEPT FRAME-JSON`.
//! - **Listening** is one connection of its own (a pooled connection is never read between queries,
//!   so it would not see notifications). When it is lost, it is re-established with backoff, and
//!   every local connection looks at its queue again (a catch-up: nothing waits for a poll). Every
//!   [`SAFETY_POLL`] the connection is pinged and the same catch-up runs, as a safety net.
//! - **Heartbeats**: each replica refreshes its `replicas` row every [`HEARTBEAT`]; one whose row is
//!   older than [`REPLICA_TIMEOUT`] is dead, and the first replica to notice deletes it in one
//!   statement (so one replica handles each death): its connections leave presence and its leases
//!   are freed, so its recipients' items go out at once wherever they reconnect.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use futures_util::StreamExt;
use mesh_proto::{MeshId, PublicKey, now_ms};
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use super::{PgStore, TxError, parse};
use crate::store::{ClusterEvent, Note, StoreError};

/// The channel replicas notify each other on.
const CHANNEL: &str = "mesh_broker";
/// How often a replica refreshes its heartbeat.
pub(super) const HEARTBEAT: Duration = Duration::from_secs(5);
/// A replica whose heartbeat is older than this is dead.
pub(super) const REPLICA_TIMEOUT: Duration = Duration::from_secs(15);
/// How often the listening connection is pinged and every local connection looks at its queue.
pub(super) const SAFETY_POLL: Duration = Duration::from_secs(30);
/// The largest payload sent (PostgreSQL refuses 8000 bytes and more).
const MAX_PAYLOAD: usize = 7_900;

/// What the coalescing task sends.
#[derive(Debug)]
pub(super) enum Outgoing {
    Note(Note),
    Kick { replica: i64, conn: u64, mesh: MeshId, key: PublicKey },
}

/// The coalescing task's queue: filled by [`PgStore`], taken by [`PgStore::start_cluster`].
#[derive(Debug)]
pub(super) struct Outbox {
    pub(super) tx: mpsc::UnboundedSender<Outgoing>,
    pub(super) rx: Mutex<Option<mpsc::UnboundedReceiver<Outgoing>>>,
}

impl Outbox {
    pub(super) fn new() -> Outbox {
        let (tx, rx) = mpsc::unbounded_channel();
        Outbox { tx, rx: Mutex::new(Some(rx)) }
    }
}

impl PgStore {
    pub(super) fn start_cluster(
        &self,
        events: mpsc::UnboundedSender<ClusterEvent>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        match self.outbox.rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take() {
            Some(rx) => {
                tokio::spawn(self.clone().notify_loop(rx, stop.clone()));
            }
            None => tracing::error!("this store's notes to the other replicas were taken already"),
        }
        tokio::spawn(self.clone().listen_loop(events.clone(), stop.clone()));
        tokio::spawn(self.clone().heartbeat_loop(events, stop))
    }

    pub(super) fn publish_outgoing(&self, out: Outgoing) {
        // The receiver lives as long as the replica; once it is gone there is no one to tell.
        let _ = self.outbox.tx.send(out);
    }

    /// Sends what is queued, coalesced, until `stop`; then what is still queued (the connections'
    /// last presence notes: `stop` comes after they closed).
    async fn notify_loop(self, mut rx: mpsc::UnboundedReceiver<Outgoing>, stop: CancellationToken) {
        loop {
            let first = tokio::select! {
                () = stop.cancelled() => None,
                next = rx.recv() => match next { Some(n) => Some(n), None => return },
            };
            let mut batch: Vec<Outgoing> = first.into_iter().collect();
            while let Ok(more) = rx.try_recv() {
                batch.push(more);
            }
            for payload in payloads(self.replica, batch) {
                if let Err(e) = self.notify(&payload).await {
                    // The others catch up when their listening connections come back, and every
                    // safety poll.
                    tracing::warn!(error = %mesh_proto::error::chain(&e), "telling the other replicas failed");
                }
            }
            if stop.is_cancelled() {
                return;
            }
        }
    }

    async fn notify(&self, payload: &str) -> Result<(), StoreError> {
        self.execute("SELECT pg_notify($1, $2)", &[&CHANNEL, &payload]).await?;
        Ok(())
    }

    /// Keeps one connection listening, re-established when lost; each time it (re)starts
    /// listening, every local connection catches up.
    async fn listen_loop(self, events: mpsc::UnboundedSender<ClusterEvent>, stop: CancellationToken) {
        let mut backoff = Duration::from_millis(250);
        loop {
            match self.listen_once(&events, &stop).await {
                Ok(()) => return,
                Err(why) => {
                    tracing::warn!(%why, ?backoff, "the connection listening to the other replicas was lost; reconnecting")
                }
            }
            tokio::select! {
                () = stop.cancelled() => return,
                () = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// Listens until `stop` (`Ok`) or until the connection fails (`Err`, with why).
    async fn listen_once(
        &self,
        events: &mpsc::UnboundedSender<ClusterEvent>,
        stop: &CancellationToken,
    ) -> Result<(), String> {
        let (client, mut connection) = self.pg_config.connect(NoTls).await.map_err(|e| mesh_proto::error::chain(&e))?;
        let (note_tx, mut notes) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if note_tx.send(n.payload().to_owned()).is_err() {
                            return "stopped".to_owned();
                        }
                    }
                    Ok(_) => {}
                    Err(e) => return mesh_proto::error::chain(&e),
                }
            }
            "the server closed the connection".to_owned()
        });
        let result = async {
            client.batch_execute(&format!("LISTEN {CHANNEL}")).await.map_err(|e| mesh_proto::error::chain(&e))?;
            tracing::info!("listening to the other replicas");
            // Anything told while nobody here was listening is looked for now.
            let _ = events.send(ClusterEvent::CatchUp { presence: true });
            let mut poll = tokio::time::interval_at(tokio::time::Instant::now() + SAFETY_POLL, SAFETY_POLL);
            loop {
                tokio::select! {
                    () = stop.cancelled() => return Ok(()),
                    payload = notes.recv() => match payload {
                        Some(payload) => self.dispatch(&payload, events),
                        None => return Err("the listening connection closed".to_owned()),
                    },
                    _ = poll.tick() => {
                        match tokio::time::timeout(Duration::from_secs(5), client.simple_query("SELECT 1")).await {
                            Ok(Ok(_)) => {}
                            Ok(Err(e)) => return Err(mesh_proto::error::chain(&e)),
                            Err(_) => return Err("the listening connection stopped answering".to_owned()),
                        }
                        let _ = events.send(ClusterEvent::CatchUp { presence: false });
                    }
                }
            }
        }
        .await;
        driver.abort();
        match (&result, driver.await) {
            (Err(_), Ok(why)) => Err(why),
            _ => result,
        }
    }

    /// Hands the notes of one payload from another replica to the broker.
    fn dispatch(&self, payload: &str, events: &mpsc::UnboundedSender<ClusterEvent>) {
        let mut lines = payload.lines();
        let from: Option<i64> = lines.next().and_then(|l| l.parse().ok());
        if from.is_none_or(|r| r == self.replica) {
            return;
        }
        for line in lines {
            match parse_note(line, self.replica) {
                Some(Some(event)) => {
                    let _ = events.send(event);
                }
                Some(None) => {}
                None => tracing::warn!(note = line, "a note from another replica this build does not read; ignored"),
            }
        }
    }

    /// Refreshes this replica's heartbeat; buries replicas whose heartbeat stopped. A replica buries
    /// others only after its own heartbeat has gone through for [`REPLICA_TIMEOUT`]: after the
    /// database itself was away, every replica's heartbeat is old, and the first one back must not
    /// take the others for dead.
    async fn heartbeat_loop(self, events: mpsc::UnboundedSender<ClusterEvent>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(HEARTBEAT);
        let mut healthy_since: Option<tokio::time::Instant> = None;
        loop {
            tokio::select! {
                () = stop.cancelled() => break,
                _ = tick.tick() => {}
            }
            let beat = self.beat(&events).await;
            let _ = events.send(ClusterEvent::Heartbeat { ok: beat.is_ok() });
            match beat {
                Ok(()) => {
                    let since = *healthy_since.get_or_insert_with(tokio::time::Instant::now);
                    if since.elapsed() >= REPLICA_TIMEOUT
                        && let Err(e) = self.bury(&events).await
                    {
                        tracing::warn!(error = %mesh_proto::error::chain(&e), "looking for dead replicas failed; will retry");
                    }
                }
                Err(e) => {
                    healthy_since = None;
                    tracing::warn!(error = %mesh_proto::error::chain(&e), "replica heartbeat failed; will retry");
                }
            }
        }
        if let Err(e) = self.goodbye().await {
            tracing::warn!(error = %mesh_proto::error::chain(&e), "leaving the replicas; the others will see this one time out");
        }
    }

    async fn beat(&self, events: &mpsc::UnboundedSender<ClusterEvent>) -> Result<(), StoreError> {
        let now = now_ms() as i64;
        let client = self.client().await?;
        let alive = client
            .execute("UPDATE replicas SET heartbeat_at = $2 WHERE id = $1", &[&self.replica, &now])
            .await
            .map_err(TxError::from)?;
        if alive == 0 {
            // Taken for dead (paused or cut off longer than the timeout): back, under the same
            // number, and this replica's connections are claimed (and announced) again.
            client
                .execute(
                    "INSERT INTO replicas (id, started_at, heartbeat_at) OVERRIDING SYSTEM VALUE VALUES ($1, $2, $2)
                     ON CONFLICT (id) DO UPDATE SET heartbeat_at = $2",
                    &[&self.replica, &now],
                )
                .await
                .map_err(TxError::from)?;
            tracing::warn!(
                replica = self.replica,
                "the other replicas took this one for dead; claiming its connections again"
            );
            let _ = events.send(ClusterEvent::Reclaim);
        }
        Ok(())
    }

    /// Deletes replicas whose heartbeat is older than [`REPLICA_TIMEOUT`], with their connections,
    /// and frees their leases.
    async fn bury(&self, events: &mpsc::UnboundedSender<ClusterEvent>) -> Result<(), StoreError> {
        let dead_before = now_ms() as i64 - REPLICA_TIMEOUT.as_millis() as i64;
        let buried = transaction!(self, 1, |tx| {
            let dead: Vec<i64> = tx
                .query("DELETE FROM replicas WHERE heartbeat_at < $1 RETURNING id", &[&dead_before])
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if dead.is_empty() {
                return Ok((dead, vec![], vec![]));
            }
            let gone = tx
                .query("DELETE FROM connections WHERE replica = ANY($1) RETURNING mesh_id, key", &[&dead])
                .await?
                .iter()
                .map(|r| Ok((parse::<MeshId>(r.get(0))?, parse::<PublicKey>(r.get(1))?)))
                .collect::<Result<Vec<_>, TxError>>()?;
            let freed = free_leases(&tx, &dead).await?;
            (dead, gone, freed)
        })?;
        let (dead, gone, freed) = buried;
        if !dead.is_empty() {
            tracing::warn!(replicas = ?dead, connections = gone.len(), recipients = freed.len(),
                "replicas stopped without a goodbye; their connections left and their leases were freed");
        }
        for (mesh, key) in gone {
            let _ = events.send(ClusterEvent::Gone { mesh, key });
        }
        for (mesh, key) in freed {
            let _ = events.send(ClusterEvent::Wake { mesh, key });
            self.publish_outgoing(Outgoing::Note(Note::Wake { mesh, key }));
        }
        Ok(())
    }

    /// Leaves the replicas: this one's connections and leases are freed at once.
    async fn goodbye(&self) -> Result<(), StoreError> {
        let freed = transaction!(self, 1, |tx| {
            let me = [self.replica];
            tx.execute("DELETE FROM connections WHERE replica = $1", &[&self.replica]).await?;
            tx.execute("DELETE FROM replicas WHERE id = $1", &[&self.replica]).await?;
            free_leases(&tx, &me).await?
        })?;
        let payloads = payloads(
            self.replica,
            freed.into_iter().map(|(mesh, key)| Outgoing::Note(Note::Wake { mesh, key })).collect(),
        );
        for payload in payloads {
            self.notify(&payload).await?;
        }
        tracing::info!(replica = self.replica, "left the replicas");
        Ok(())
    }

    pub(super) async fn claim(
        &self,
        mesh: MeshId,
        key: PublicKey,
        member: PublicKey,
        conn: u64,
    ) -> Result<(), StoreError> {
        let rows = self
            .query(
                "WITH old AS (SELECT replica, conn FROM connections WHERE mesh_id = $1 AND key = $2)
                 INSERT INTO connections (mesh_id, key, member, replica, conn, since) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (mesh_id, key) DO UPDATE SET
                     member = excluded.member, replica = excluded.replica, conn = excluded.conn, since = excluded.since
                 RETURNING (SELECT replica FROM old), (SELECT conn FROM old)",
                &[
                    &mesh.to_string(),
                    &key.to_string(),
                    &member.to_string(),
                    &self.replica,
                    &(conn as i64),
                    &(now_ms() as i64),
                ],
            )
            .await?;
        let old = rows.first().map(|r| (r.get::<_, Option<i64>>(0), r.get::<_, Option<i64>>(1)));
        if let Some((Some(replica), Some(old))) = old
            && replica != self.replica
        {
            self.publish_outgoing(Outgoing::Kick { replica, conn: old as u64, mesh, key });
        }
        Ok(())
    }

    /// [`PgStore::claim`] only where no other replica holds the key now (or this one still does).
    pub(super) async fn reclaim(
        &self,
        mesh: MeshId,
        key: PublicKey,
        member: PublicKey,
        conn: u64,
    ) -> Result<bool, StoreError> {
        let claimed = self
            .execute(
                "INSERT INTO connections (mesh_id, key, member, replica, conn, since) VALUES ($1, $2, $3, $4, $5, $6)
                 ON CONFLICT (mesh_id, key) DO UPDATE SET member = excluded.member, conn = excluded.conn
                 WHERE connections.replica = excluded.replica",
                &[
                    &mesh.to_string(),
                    &key.to_string(),
                    &member.to_string(),
                    &self.replica,
                    &(conn as i64),
                    &(now_ms() as i64),
                ],
            )
            .await?;
        Ok(claimed == 1)
    }

    pub(super) async fn unclaim(&self, mesh: MeshId, key: PublicKey, conn: u64) -> Result<(), StoreError> {
        self.execute(
            "DELETE FROM connections WHERE mesh_id = $1 AND key = $2 AND replica = $3 AND conn = $4",
            &[&mesh.to_string(), &key.to_string(), &self.replica, &(conn as i64)],
        )
        .await?;
        Ok(())
    }

    pub(super) async fn connected_keys(&self, mesh: MeshId) -> Result<Vec<(PublicKey, PublicKey)>, StoreError> {
        let rows = self.query("SELECT key, member FROM connections WHERE mesh_id = $1", &[&mesh.to_string()]).await?;
        Ok(rows.iter().map(|r| Ok((parse(r.get(0))?, parse(r.get(1))?))).collect::<Result<_, TxError>>()?)
    }
}

/// Frees the leases held by `replicas`; the (mesh, recipient) pairs whose items are free again.
async fn free_leases(
    tx: &impl deadpool_postgres::GenericClient,
    replicas: &[i64],
) -> Result<Vec<(MeshId, PublicKey)>, TxError> {
    let rows = tx
        .query(
            "WITH freed AS (
                 UPDATE queue SET lease_until = NULL, lease_replica = NULL, lease_conn = NULL
                 WHERE lease_replica = ANY($1) RETURNING mesh_id, recipient)
             SELECT DISTINCT mesh_id, recipient FROM freed",
            &[&replicas],
        )
        .await?;
    rows.iter().map(|r| Ok((parse(r.get(0))?, parse(r.get(1))?))).collect()
}

/// The payloads carrying `batch` from `replica`: wake-ups deduplicated, each under the size limit.
fn payloads(replica: i64, batch: Vec<Outgoing>) -> Vec<String> {
    let head = format!("{replica}\n");
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    let mut current = head.clone();
    for item in batch {
        let line = match item {
            Outgoing::Note(Note::Wake { mesh, key }) => {
                if !seen.insert((mesh, key)) {
                    continue;
                }
                format!("w {mesh} {key}\n")
            }
            Outgoing::Kick { replica, conn, mesh, key } => format!("k {replica} {conn} {mesh} {key}\n"),
            Outgoing::Note(Note::Presence { mesh, except, frame }) => format!("p {mesh} {except} {frame}\n"),
            // Names have no line breaks; the words are the broker's own.
            Outgoing::Note(Note::Revoke { mesh, key, why }) => format!("r {mesh} {key} {}\n", why.replace('\n', " ")),
            Outgoing::Note(Note::Deleted { mesh, why }) => format!("d {mesh} {}\n", why.replace('\n', " ")),
        };
        if head.len() + line.len() > MAX_PAYLOAD {
            tracing::warn!(bytes = line.len(), "a note too large to tell the other replicas; dropped");
            continue;
        }
        if current.len() + line.len() > MAX_PAYLOAD {
            out.push(std::mem::replace(&mut current, head.clone()));
        }
        current.push_str(&line);
    }
    if current.len() > head.len() {
        out.push(current);
    }
    out
}

/// One line of a payload: `Some(Some(event))` for this replica, `Some(None)` for another replica
/// (a kick of someone else's connection), `None` when unreadable.
fn parse_note(line: &str, me: i64) -> Option<Option<ClusterEvent>> {
    let (kind, rest) = line.split_once(' ')?;
    match kind {
        "w" => {
            let (mesh, key) = rest.split_once(' ')?;
            Some(Some(ClusterEvent::Wake { mesh: mesh.parse().ok()?, key: key.parse().ok()? }))
        }
        "k" => {
            let mut words = rest.split(' ');
            let replica: i64 = words.next()?.parse().ok()?;
            let conn: u64 = words.next()?.parse().ok()?;
            let mesh = words.next()?.parse().ok()?;
            let key = words.next()?.parse().ok()?;
            Some((replica == me).then_some(ClusterEvent::Kick { mesh, key, conn }))
        }
        "p" => {
            let mut words = rest.splitn(3, ' ');
            let mesh = words.next()?.parse().ok()?;
            let except = words.next()?.parse().ok()?;
            let frame = words.next()?.to_owned();
            Some(Some(ClusterEvent::Presence { mesh, except, frame }))
        }
        "r" => {
            let mut words = rest.splitn(3, ' ');
            let mesh = words.next()?.parse().ok()?;
            let key = words.next()?.parse().ok()?;
            let why = words.next().unwrap_or_default().to_owned();
            Some(Some(ClusterEvent::Revoke { mesh, key, why }))
        }
        "d" => {
            let (mesh, why) = rest.split_once(' ').unwrap_or((rest, ""));
            Some(Some(ClusterEvent::Deleted { mesh: mesh.parse().ok()?, why: why.to_owned() }))
        }
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notes_survive_a_payload_and_wake_ups_are_coalesced() {
        let (mesh, key, other) = (MeshId::generate(), mesh_proto::Identity::generate().key(), MeshId::generate());
        let frame = r#"{"type":"presence","peer":{"name":"a b"}}"#.to_owned();
        let batch = vec![
            Outgoing::Note(Note::Wake { mesh, key }),
            Outgoing::Note(Note::Wake { mesh, key }),
            Outgoing::Kick { replica: 7, conn: 42, mesh, key },
            Outgoing::Kick { replica: 8, conn: 43, mesh, key },
            Outgoing::Note(Note::Presence { mesh: other, except: key, frame: frame.clone() }),
            Outgoing::Note(Note::Revoke { mesh, key, why: "removed by alice".into() }),
        ];
        let sent = payloads(3, batch);
        assert_eq!(sent.len(), 1);
        let lines: Vec<&str> = sent[0].lines().collect();
        assert_eq!(lines.len(), 6, "the sender, one wake-up, two kicks, one presence, one removal: {lines:?}");
        assert_eq!(lines[0], "3");
        let events: Vec<Option<ClusterEvent>> =
            lines[1..].iter().map(|l| parse_note(l, 7).expect("readable")).collect();
        assert_eq!(
            events,
            [
                Some(ClusterEvent::Wake { mesh, key }),
                Some(ClusterEvent::Kick { mesh, key, conn: 42 }),
                None,
                Some(ClusterEvent::Presence { mesh: other, except: key, frame }),
                Some(ClusterEvent::Revoke { mesh, key, why: "removed by alice".into() }),
            ]
        );
        assert!(parse_note("x what", 7).is_none());
        assert!(parse_note("w not-a-mesh key", 7).is_none());
    }

    #[test]
    fn many_notes_are_split_under_the_payload_limit() {
        let batch: Vec<Outgoing> = (0..500)
            .map(|_| {
                Outgoing::Note(Note::Wake { mesh: MeshId::generate(), key: mesh_proto::Identity::generate().key() })
            })
            .collect();
        let sent = payloads(1, batch);
        assert!(sent.len() > 1);
        assert!(sent.iter().all(|p| p.len() <= MAX_PAYLOAD && p.starts_with("1\n")));
        assert_eq!(sent.iter().map(|p| p.lines().count() - 1).sum::<usize>(), 500, "none lost");
    }
}
