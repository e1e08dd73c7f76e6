//! The in-memory view of who is connected: one entry per (mesh, key), each with the handles the rest
//! of the broker needs to reach that connection. The store is the source of truth for queues; the hub
//! only wakes connections and carries presence.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};

use mesh_proto::{MeshId, PublicKey};
use tokio::sync::{Notify, mpsc};
use tokio_util::sync::CancellationToken;

/// What a connection's writer task sends on the socket.
#[derive(Debug)]
pub enum Outbound {
    Text(String),
    Close { code: u16, reason: String },
}

#[derive(Clone, Debug)]
pub struct ConnHandle {
    pub conn_id: u64,
    /// The member the connection speaks for (its own key for a member).
    pub member: PublicKey,
    /// Wakes the connection's deliverer: its queue has new items.
    pub wake: Arc<Notify>,
    /// Frames for the socket; `try_send` only, so a slow connection never blocks the hub.
    pub outbound: mpsc::Sender<Outbound>,
    /// Cancelled when the connection must end: another connection superseded it, or its key was
    /// removed from the mesh.
    pub kicked: CancellationToken,
    /// Why it was ended (the WebSocket close reason).
    pub kick_reason: Arc<std::sync::OnceLock<&'static str>>,
}

impl ConnHandle {
    /// Tells the connection a newer one of its key took its place, and ends it.
    pub fn supersede(&self) {
        self.end(mesh_proto::wire::ErrorCode::Superseded, "another connection authenticated with this key");
    }

    /// Tells the connection its key is out of the mesh (`why`), and ends it.
    pub fn revoke(&self, why: &str) {
        self.end(mesh_proto::wire::ErrorCode::Revoked, why);
    }

    /// Tells the connection why it ends (`code`, `why`), and ends it.
    pub fn end(&self, code: mesh_proto::wire::ErrorCode, why: &str) {
        let frame = mesh_proto::wire::ServerFrame::Error(mesh_proto::wire::ErrorFrame::new(code, why));
        let _ = self.outbound.try_send(Outbound::Text(frame.to_json()));
        let _ = self.kick_reason.set(code.as_str());
        self.kicked.cancel();
    }
}

#[derive(Default, Debug)]
pub struct Hub {
    meshes: Mutex<HashMap<MeshId, HashMap<PublicKey, ConnHandle>>>,
}

impl Hub {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<MeshId, HashMap<PublicKey, ConnHandle>>> {
        self.meshes.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Registers a connection and returns the one it replaces, if any.
    pub fn register(&self, mesh: MeshId, key: PublicKey, handle: ConnHandle) -> Option<ConnHandle> {
        self.lock().entry(mesh).or_default().insert(key, handle)
    }

    /// Removes the connection if it is still the registered one for its key; true if it was.
    pub fn unregister(&self, mesh: MeshId, key: PublicKey, conn_id: u64) -> bool {
        let mut meshes = self.lock();
        let Some(conns) = meshes.get_mut(&mesh) else {
            return false;
        };
        if conns.get(&key).is_some_and(|h| h.conn_id == conn_id) {
            conns.remove(&key);
            if conns.is_empty() {
                meshes.remove(&mesh);
            }
            return true;
        }
        false
    }

    /// The connections of `mesh` here: each key with its member.
    pub fn connected(&self, mesh: MeshId) -> std::collections::HashMap<PublicKey, PublicKey> {
        self.lock().get(&mesh).map(|c| c.iter().map(|(k, h)| (*k, h.member)).collect()).unwrap_or_default()
    }

    pub fn is_online(&self, mesh: MeshId, key: &PublicKey) -> bool {
        self.lock().get(&mesh).is_some_and(|c| c.contains_key(key))
    }

    /// Every connected (mesh, key).
    pub fn online(&self) -> Vec<(MeshId, PublicKey)> {
        self.lock().iter().flat_map(|(mesh, conns)| conns.keys().map(|k| (*mesh, *k))).collect()
    }

    /// Wakes the connection of `key`, if it is here; whether it was.
    pub fn wake(&self, mesh: MeshId, key: &PublicKey) -> bool {
        match self.lock().get(&mesh).and_then(|c| c.get(key)) {
            Some(h) => {
                h.wake.notify_one();
                true
            }
            None => false,
        }
    }

    /// Wakes every connection: each looks at its queue again.
    pub fn wake_all(&self) {
        for h in self.lock().values().flat_map(HashMap::values) {
            h.wake.notify_one();
        }
    }

    /// The connection of `key`, if it is here.
    pub fn handle(&self, mesh: MeshId, key: &PublicKey) -> Option<ConnHandle> {
        self.lock().get(&mesh).and_then(|c| c.get(key)).cloned()
    }

    /// The connections of `mesh` here.
    pub fn mesh_handles(&self, mesh: MeshId) -> Vec<ConnHandle> {
        self.lock().get(&mesh).map(|c| c.values().cloned().collect()).unwrap_or_default()
    }

    /// Every connection here: (mesh, key, its handle).
    pub fn handles(&self) -> Vec<(MeshId, PublicKey, ConnHandle)> {
        self.lock().iter().flat_map(|(m, c)| c.iter().map(|(k, h)| (*m, *k, h.clone()))).collect()
    }

    /// Sends `frame` to every connection of `mesh` except `except`. A connection whose outbound buffer
    /// is full is already far behind: it misses this frame and sees current presence in its next
    /// `roster` reply. Presence is advisory; queues are not.
    pub fn broadcast(&self, mesh: MeshId, except: &PublicKey, frame: &str) {
        let meshes = self.lock();
        let Some(conns) = meshes.get(&mesh) else {
            return;
        };
        for (key, h) in conns {
            if key != except && h.outbound.try_send(Outbound::Text(frame.to_owned())).is_err() {
                tracing::debug!(conn = h.conn_id, "presence frame skipped: connection buffer full");
            }
        }
    }
}
