//! The daemon's shared state: the database, the member identity, the running links, and the
//! cancellation token and task tracker every task of the process hangs off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mesh_broker::sqlite::Db;
use mesh_ipc::Home;
use mesh_ipc::api::{LinkState, LinkStatus};
use mesh_proto::pin::CertPin;
use mesh_proto::{Identity, MeshId, PublicKey};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::clock::now_ms;
use crate::identity::Member;
use crate::link::{self, LinkHandle, LinkSpec};
use crate::meshes::MeshRow;
use crate::process::{self, ProcessId};
use crate::sessions::{self, LaunchError, Session, SessionRegistry};
use crate::{outbox, roster};

/// How often inflight rows whose lease ran out are returned to pending.
const LEASE_SWEEP: Duration = Duration::from_secs(10);
/// How often live sessions' processes are checked.
const REAP_EVERY: Duration = Duration::from_secs(1);

pub struct Daemon {
    pub home: Home,
    pub db: Db,
    pub member: Member,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub inbox_wake: Notify,
    pub started_at: u64,
    /// Fault injection for tests (`MESH_FAULT_DECRYPT_FAILURES=N`): the next N decryptions fail.
    pub inject_decrypt_failures: std::sync::atomic::AtomicU32,
    /// Fault injection for tests (`MESH_FAULT_ACK_DELAY_MS=N`): acks leave N ms after their commit,
    /// while the link goes on reading, so that redeliveries cross them.
    pub inject_ack_delay: std::sync::OnceLock<Duration>,
    /// SHA-256 of the member's bearer token (see `Home::member_token_path`).
    pub member_token_hash: std::sync::OnceLock<String>,
    pub embedded_broker: Mutex<Option<String>>,
    pub sessions: SessionRegistry,
    pub changed: Arc<crate::events::Changed>,
    /// Waiting notice claims (`POST /v1/notices/claim` with a wait).
    pub claimants: crate::notices::Claimants,
    /// What the daemon counts while it runs (`GET /v1/metrics`).
    pub counters: crate::metrics::Counters,
    /// `config/daemon.json`'s `webhooks` section (defaults until start-up has read it).
    pub webhook_config: std::sync::OnceLock<crate::webhooks::Config>,
    links: Mutex<HashMap<(MeshId, PublicKey), LinkHandle>>,
    /// Each mesh's broker certificate pin, read by its links at every connect.
    tls_pins: Mutex<HashMap<MeshId, CertPin>>,
    /// One new mesh key at a time per mesh.
    rekey_locks: Mutex<HashMap<MeshId, Arc<tokio::sync::Mutex<()>>>>,
}

impl Daemon {
    pub fn new(home: Home, db: Db, member: Member, shutdown: CancellationToken, tracker: TaskTracker) -> Daemon {
        Daemon {
            home,
            db,
            member,
            shutdown,
            tracker,
            inbox_wake: Notify::new(),
            member_token_hash: std::sync::OnceLock::new(),
            inject_decrypt_failures: std::sync::atomic::AtomicU32::new(0),
            inject_ack_delay: std::sync::OnceLock::new(),
            started_at: now_ms(),
            embedded_broker: Mutex::new(None),
            sessions: SessionRegistry::default(),
            changed: crate::events::Changed::new(),
            claimants: Default::default(),
            webhook_config: std::sync::OnceLock::new(),
            counters: Default::default(),
            links: Mutex::new(HashMap::new()),
            tls_pins: Mutex::new(HashMap::new()),
            rekey_locks: Mutex::new(HashMap::new()),
        }
    }

    /// The secret identity that owns `key` (the member or one of its sessions), if it is ours.
    pub fn identity_for(&self, key: &PublicKey) -> Option<Identity> {
        if self.member.identity.key() == *key {
            return Some(self.member.identity.clone());
        }
        self.sessions.by_key(key).map(|s| s.identity.clone())
    }

    /// The lock that makes new keys of `mesh` one at a time.
    pub fn rekey_lock(&self, mesh: &MeshId) -> Arc<tokio::sync::Mutex<()>> {
        self.rekey_locks.lock().unwrap_or_else(PoisonError::into_inner).entry(*mesh).or_default().clone()
    }

    /// The pin of `mesh`'s broker certificate, if it has one.
    pub fn tls_pin(&self, mesh: &MeshId) -> Option<CertPin> {
        self.tls_pins.lock().unwrap_or_else(PoisonError::into_inner).get(mesh).copied()
    }

    /// Changes (or drops) the pin of `mesh`'s broker certificate (stored already) and has its links
    /// that are waiting to reconnect try again now.
    pub fn repin(&self, mesh: &MeshId, pin: Option<CertPin>) {
        let mut pins = self.tls_pins.lock().unwrap_or_else(PoisonError::into_inner);
        match pin {
            Some(pin) => pins.insert(*mesh, pin),
            None => pins.remove(mesh),
        };
        drop(pins);
        for ((m, _), link) in self.links.lock().unwrap_or_else(PoisonError::into_inner).iter() {
            if m == mesh {
                link.retry.notify_one();
            }
        }
    }

    /// Starts the member's link to `mesh` (once; a second call is a no-op).
    pub fn attach_mesh(self: &Arc<Self>, mesh: &MeshRow) {
        if let Some(pin) = mesh.tls_pin {
            self.tls_pins.lock().unwrap_or_else(PoisonError::into_inner).insert(mesh.id, pin);
        }
        self.start_link(LinkSpec {
            mesh_id: mesh.id,
            mesh_name: mesh.name.clone(),
            broker_url: mesh.broker_url.clone(),
            identity: self.member.identity.clone(),
            name: Arc::new(Mutex::new(mesh.display_name(&self.member.name).to_owned())),
            attest: None,
        });
    }

    fn start_link(self: &Arc<Self>, spec: LinkSpec) {
        let key = (spec.mesh_id, spec.identity.key());
        let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        links.entry(key).or_insert_with(|| link::spawn(self, spec));
    }

    /// Forgets a mesh this member has left: its links (the member's and its sessions') stop, sends not
    /// yet accepted in it are dead ("left the mesh"), and the mesh and its roster are gone from here.
    /// Messages received in it stay in the inbox.
    pub async fn forget_mesh(&self, mesh: &MeshId) -> Result<(), mesh_broker::sqlite::DbError> {
        // Its live sessions end: their mesh is gone from here (their tokens stop working).
        for session in self.sessions.live().into_iter().filter(|s| s.mesh_id == *mesh) {
            self.end_session(&session).await;
        }
        let links: Vec<LinkHandle> = {
            let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
            let keys: Vec<(MeshId, PublicKey)> = links.keys().filter(|(m, _)| m == mesh).copied().collect();
            keys.iter().filter_map(|k| links.remove(k)).collect()
        };
        for link in links {
            link.cancel.cancel();
        }
        let id = *mesh;
        let dead = self
            .db
            .call(move |c| {
                let tx = c.transaction()?;
                let dead = crate::outbox::kill_mesh(&tx, &id, "left the mesh", now_ms())?;
                tx.execute("DELETE FROM meshes WHERE id = ?1", [id.to_string()])?;
                tx.commit()?;
                Ok(dead)
            })
            .await?;
        self.tls_pins.lock().unwrap_or_else(PoisonError::into_inner).remove(mesh);
        tracing::info!(mesh = %mesh, dead_sends = dead, "left the mesh; forgotten here");
        self.notify_changed();
        Ok(())
    }

    fn stop_link(&self, mesh: &MeshId, key: &PublicKey) {
        if let Some(h) = self.links.lock().unwrap_or_else(PoisonError::into_inner).remove(&(*mesh, *key)) {
            h.cancel.cancel();
        }
    }

    /// Starts the broker link of a live session, attested by the member on every connect.
    fn attach_session(self: &Arc<Self>, s: &Session, mesh: &MeshRow) {
        let member = self.member.identity.clone();
        let (mesh_id, session, name) = (s.mesh_id, s.key(), s.name.clone());
        let attest = move || {
            let now = now_ms();
            let claims = mesh_proto::attestation::SessionAttestation {
                v: 1,
                mesh_id,
                member: member.key(),
                session,
                name: name.clone(),
                issued_at: now,
                expires_at: now + mesh_proto::attestation::MAX_ATTESTATION_MS,
            };
            mesh_proto::signed::Signed::sign(&member, &claims)
        };
        self.start_link(LinkSpec {
            mesh_id: s.mesh_id,
            mesh_name: mesh.name.clone(),
            broker_url: mesh.broker_url.clone(),
            identity: s.identity.clone(),
            name: Arc::new(Mutex::new(s.name.clone())),
            attest: Some(Arc::new(attest)),
        });
    }

    /// Registers a launch of session `name` in `mesh` by process `pid` and connects it.
    pub async fn launch_session(
        self: &Arc<Self>,
        mesh: MeshRow,
        name: String,
        pid: ProcessId,
    ) -> Result<Arc<Session>, LaunchError> {
        let dir = self.home.run_dir.join("sessions");
        let mesh_id = mesh.id;
        let launched = self.db.call(move |c| Ok(sessions::launch(c, &dir, &mesh_id, &name, &pid, now_ms()))).await??;
        if launched.replaced_stale {
            self.stop_link(&mesh.id, &launched.session.key());
        }
        let s = self.sessions.put(launched.session);
        tracing::info!(session = %s.name, mesh = %mesh.name, key = %s.key().short(), pid = ?s.process.as_ref().map(|p| p.pid), "session launched");
        self.attach_session(&s, &mesh);
        Ok(s)
    }

    /// Ends a session's live launch: its token stops working and its broker link closes (its queued
    /// messages wait at the broker for its next launch).
    pub async fn end_session(&self, s: &Session) {
        let launch = s.clone();
        match self.db.call(move |c| sessions::end(c, &launch, now_ms())).await {
            Ok(Some(ended)) => {
                tracing::info!(session = %ended.name, "session ended");
                self.stop_link(&ended.mesh_id, &ended.key());
                let mesh = ended.mesh_id;
                let key = ended.key();
                let at = ended.ended_at;
                self.sessions.put(ended);
                let _ = self.db.call(move |c| roster::mark_ended(c, &mesh, &key, at)).await;
                // The member's link tells the broker, so the session stops counting as a recipient.
                self.wake_drain(&mesh, &self.member.identity.key());
            }
            Ok(None) => {}
            Err(e) => tracing::error!(error = %mesh_proto::error::chain(&e), "ending a session; will retry"),
        }
    }

    /// Loads the session registry; sessions whose process still runs get their links back.
    pub async fn rehydrate_sessions(self: &Arc<Self>, meshes: &[MeshRow]) -> Result<(), mesh_broker::sqlite::DbError> {
        for s in self.db.call(|c| sessions::load_all(c)).await? {
            let s = self.sessions.put(s);
            if !s.is_live() {
                continue;
            }
            match (s.process.as_ref().filter(|p| process::is_alive(p)), meshes.iter().find(|m| m.id == s.mesh_id)) {
                (Some(_), Some(mesh)) => self.attach_session(&s, mesh),
                _ => self.end_session(&s).await,
            }
        }
        Ok(())
    }

    /// Whether to fail this decryption on purpose (see `inject_decrypt_failures`).
    pub fn take_injected_fault(&self) -> bool {
        use std::sync::atomic::Ordering;
        self.inject_decrypt_failures.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1)).is_ok()
    }

    /// Deletes rows past their retention, at start-up and then hourly.
    pub async fn janitor(self: Arc<Self>, config: crate::retention::DaemonConfig) {
        let mut tick = tokio::time::interval(crate::retention::SWEEP_EVERY);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            let config = config.clone();
            match self.db.call(move |c| crate::retention::sweep(c, &config, now_ms())).await {
                Ok(s) if s == crate::retention::Swept::default() => {}
                Ok(s) => {
                    tracing::info!(
                        inbox = s.inbox,
                        outbox = s.outbox,
                        events = s.events,
                        webhook_deliveries = s.webhook_deliveries,
                        "retention: deleted old rows"
                    );
                    if let Err(e) = self.db.call(|c| crate::store::forget_deleted(c)).await {
                        tracing::error!(error = %mesh_proto::error::chain(&e), "emptying the write-ahead log");
                    }
                }
                Err(e) => tracing::error!(error = %mesh_proto::error::chain(&e), "retention sweep failed; will retry"),
            }
        }
    }

    /// Ends sessions whose process is gone, on a timer. A live session has no time limit.
    pub async fn session_reaper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(REAP_EVERY);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            for s in self.sessions.live() {
                if !s.process.as_ref().is_some_and(process::is_alive) {
                    self.end_session(&s).await;
                }
            }
        }
    }

    /// The running link of (mesh, key), if any.
    pub fn link(&self, mesh: &MeshId, key: &PublicKey) -> Option<LinkHandle> {
        self.links.lock().unwrap_or_else(PoisonError::into_inner).get(&(*mesh, *key)).cloned()
    }

    pub fn link_status(&self, mesh: &MeshId, key: &PublicKey) -> LinkStatus {
        self.links
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(*mesh, *key))
            .map(|h| h.status.borrow().clone())
            .unwrap_or(LinkStatus {
                state: LinkState::Offline,
                since: self.started_at,
                last_error: Some("no link".into()),
                clock_skew_ms: None,
                certificate: None,
                address: None,
            })
    }

    /// Tells outbox waiters to look again.
    pub fn notify_changed(&self) {
        self.changed.bump();
    }

    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Tells the drain of (mesh, sender) that it has new rows.
    pub fn wake_drain(&self, mesh: &MeshId, sender: &PublicKey) {
        if let Some(h) = self.links.lock().unwrap_or_else(PoisonError::into_inner).get(&(*mesh, *sender)) {
            h.drain_wake.notify_one();
        }
    }

    fn wake_all_drains(&self) {
        for h in self.links.lock().unwrap_or_else(PoisonError::into_inner).values() {
            h.drain_wake.notify_one();
        }
    }

    /// Returns inflight rows whose lease ran out to pending, on a timer.
    pub async fn lease_sweeper(self: Arc<Self>) {
        let mut tick = tokio::time::interval(LEASE_SWEEP);
        loop {
            tokio::select! {
                () = self.shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.db.call(|c| outbox::expire_leases(c, now_ms())).await {
                Ok(0) => {}
                Ok(n) => {
                    tracing::info!(rows = n, "outbox leases ran out; rows are pending again");
                    self.wake_all_drains();
                }
                Err(e) => tracing::error!(error = %mesh_proto::error::chain(&e), "sweeping outbox leases"),
            }
        }
    }
}

/// A daemon on a temporary home with one mesh ("team") whose roster holds the member itself, and no
/// links: for tests of the IPC layer without a broker.
#[cfg(test)]
pub fn for_tests() -> (tempfile::TempDir, Arc<Daemon>) {
    use mesh_proto::crypto::GroupKey;
    use mesh_proto::wire::{Peer, PeerKind, Role};

    let dir = tempfile::tempdir().expect("tempdir");
    let home = Home::at(dir.path());
    home.ensure_dirs().expect("dirs");
    let db = crate::store::open(&home.daemon_db()).expect("db");
    let member = crate::identity::create(&home, "alice").expect("identity");
    let public = member.identity.public();
    let mesh = MeshRow {
        id: MeshId::generate(),
        name: "team".into(),
        broker_url: "ws://127.0.0.1:9".into(),
        role: Role::Owner,
        group_key: GroupKey::generate(),
        key_epoch: 0,
        embedded: false,
        joined_at: 1,
        my_name: None,
        tls_pin: None,
    };
    let me = Peer {
        key: public.key,
        kind: PeerKind::Member,
        member: public.key,
        name: "alice".into(),
        enc_key: public.enc_key,
        enc_sig: public.enc_sig,
        role: Role::Owner,
        online: true,
        last_seen: None,
        groups: Some(vec![]),
        ended_at: None,
        joined_at: Some(1),
        invited_by: None,
    };
    db.call_blocking(|c| {
        crate::meshes::insert(c, &mesh)?;
        roster::upsert(c, &mesh.id, &me)
    })
    .expect("seed");
    let d = Arc::new(Daemon::new(home, db, member, CancellationToken::new(), TaskTracker::new()));
    let _ = d.member_token_hash.set(crate::sessions::token_hash("member-token"));
    (dir, d)
}
