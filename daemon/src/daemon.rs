//! The daemon's shared state: the database, the member identity, the running links, and the
//! cancellation token and task tracker every task of the process hangs off.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use mesh_broker::sqlite::Db;
use mesh_ipc::Home;
use mesh_ipc::api::{LinkState, LinkStatus};
use mesh_proto::crypto::GroupKey;
use mesh_proto::{Identity, MeshId, PublicKey, now_ms};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::identity::Member;
use crate::link::{self, LinkHandle, LinkSpec};
use crate::meshes::MeshRow;
use crate::outbox;

/// How often inflight rows whose lease ran out are returned to pending.
const LEASE_SWEEP: Duration = Duration::from_secs(10);

pub struct Daemon {
    pub home: Home,
    pub db: Db,
    pub member: Member,
    pub shutdown: CancellationToken,
    pub tracker: TaskTracker,
    pub inbox_wake: Notify,
    pub started_at: u64,
    pub embedded_broker: Mutex<Option<String>>,
    links: Mutex<HashMap<(MeshId, PublicKey), LinkHandle>>,
    group_keys: Mutex<HashMap<MeshId, GroupKey>>,
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
            started_at: now_ms(),
            embedded_broker: Mutex::new(None),
            links: Mutex::new(HashMap::new()),
            group_keys: Mutex::new(HashMap::new()),
        }
    }

    /// The secret identity that owns `key`, if it is ours.
    pub fn identity_for(&self, key: &PublicKey) -> Option<Identity> {
        (self.member.identity.key() == *key).then(|| self.member.identity.clone())
    }

    pub fn group_key(&self, mesh: &MeshId) -> Option<GroupKey> {
        self.group_keys.lock().unwrap_or_else(PoisonError::into_inner).get(mesh).cloned()
    }

    /// Starts the member's link to `mesh` (once; a second call is a no-op).
    pub fn attach_mesh(self: &Arc<Self>, mesh: &MeshRow) {
        self.group_keys.lock().unwrap_or_else(PoisonError::into_inner).insert(mesh.id, mesh.group_key.clone());
        let key = (mesh.id, self.member.identity.key());
        let mut links = self.links.lock().unwrap_or_else(PoisonError::into_inner);
        if links.contains_key(&key) {
            return;
        }
        let spec = LinkSpec {
            mesh_id: mesh.id,
            mesh_name: mesh.name.clone(),
            broker_url: mesh.broker_url.clone(),
            identity: self.member.identity.clone(),
            name: self.member.name.clone(),
            attest: None,
        };
        links.insert(key, link::spawn(self, spec));
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
            })
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
