//! Making a new mesh key (docs/security.md, "Mesh keys"): an owner's or admin's daemon generates it,
//! seals it to every member's encryption key in a signed grant (itself included, so that the key is
//! kept even if this daemon stops at once), and sends the grants over its connection; the broker
//! checks that the epoch is the next and that the grants are for exactly the mesh's members, and
//! queues each for its member. A removal makes one at once; a member leaving (or joining with an
//! older key) makes the broker say that one is wanted, and the owner's and admins' daemons make it.

use std::sync::Arc;
use std::time::Duration;

use mesh_proto::crypto::GroupKey;
use mesh_proto::wire::{ClientFrame, ErrorCode, KeyState, PeerKind, RotateKeyRequest};
use mesh_proto::{MeshId, now_ms};
use rand::Rng;

use crate::daemon::Daemon;
use crate::link::RequestError;

/// How long one request waits for the broker, and how often a conflict (the roster or the epoch
/// moved meanwhile) is tried again.
const REQUEST_WAIT: Duration = Duration::from_secs(10);
const ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum RekeyError {
    #[error("only the mesh's owner and admins make a new key; you are a {0}")]
    NotAdmin(&'static str),
    #[error("the mesh is not here any more")]
    NoMesh,
    #[error("the broker is not reachable: {0}")]
    Unreachable(String),
    #[error("the broker refused the new key: {0}")]
    Refused(String),
    #[error("the mesh's members or key kept changing; try again")]
    Conflict,
    #[error("database failure: {0}")]
    Db(String),
}

impl From<mesh_broker::sqlite::DbError> for RekeyError {
    fn from(e: mesh_broker::sqlite::DbError) -> Self {
        RekeyError::Db(mesh_proto::error::chain(&e))
    }
}

/// Records what the broker says of the mesh's key (a `welcome`, a `key_state`) for the member's link
/// of `mesh`; when a new key is wanted and this member may make it, makes it after a short delay
/// (the owner first, then admins at random moments, so that one of them does it).
pub fn heard(daemon: &Arc<Daemon>, mesh: MeshId, state: &Arc<std::sync::Mutex<Option<KeyState>>>, now_said: KeyState) {
    *state.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(now_said);
    if !now_said.rekey_wanted {
        lacking(daemon, mesh, state.clone());
        return;
    }
    let d = daemon.clone();
    daemon.tracker.spawn(async move {
        let role = d.db.call(move |c| crate::meshes::get(c, &mesh)).await.ok().flatten().map(|m| m.role);
        let delay = match role {
            Some(mesh_proto::wire::Role::Owner) => rand::thread_rng().gen_range(0..500),
            Some(mesh_proto::wire::Role::Admin) => rand::thread_rng().gen_range(1500..4000),
            _ => return,
        };
        tokio::select! {
            () = d.shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_millis(delay)) => {}
        }
        match rotate(&d, mesh, true).await {
            Ok(Some(epoch)) => tracing::info!(%mesh, epoch, "made the new mesh key the broker asked for"),
            Ok(None) => tracing::debug!(%mesh, "a new mesh key was made by someone else"),
            Err(e) => tracing::warn!(%mesh, error = %e, "could not make the new mesh key the broker asked for"),
        }
    });
}

/// How long a member waits for a key the broker says the mesh has before asking for it: a grant
/// queued for it comes with its other deliveries first.
const KEY_WAIT: Duration = Duration::from_secs(10);

/// When the broker's epoch is newer than every key held here and no grant brings it (this daemon was
/// restored from an older backup, or was away longer than a grant is kept), asks for a new key: the
/// owner's and admins' daemons then make one for everyone.
fn lacking(daemon: &Arc<Daemon>, mesh: MeshId, state: Arc<std::sync::Mutex<Option<KeyState>>>) {
    let d = daemon.clone();
    daemon.tracker.spawn(async move {
        tokio::select! {
            () = d.shutdown.cancelled() => return,
            () = tokio::time::sleep(KEY_WAIT) => {}
        }
        let Some(broker) = *state.lock().unwrap_or_else(std::sync::PoisonError::into_inner) else { return };
        let held = d.db.call(move |c| crate::meshes::get(c, &mesh)).await.ok().flatten().map(|m| m.key_epoch);
        let Some(held) = held.filter(|h| *h < broker.epoch) else { return };
        let Some(link) = d.link(&mesh, &d.member.identity.key()) else { return };
        tracing::warn!(%mesh, held, mesh_epoch = broker.epoch, "the mesh's key is newer than any held here; asking for it");
        let frame = move |id| ClientFrame::KeyWanted(mesh_proto::wire::KeyWantedRequest { id, have: held });
        if let Err(e) = link.request(frame, REQUEST_WAIT).await {
            tracing::warn!(%mesh, error = %e, "could not ask for the mesh's key");
            return;
        }
        // An owner or admin that lacks the key makes the next one itself (the others are told).
        match rotate(&d, mesh, false).await {
            Ok(Some(epoch)) => tracing::info!(%mesh, epoch, "made a new mesh key, lacking the current one"),
            Ok(None) | Err(RekeyError::NotAdmin(_)) => {}
            Err(e) => tracing::warn!(%mesh, error = %e, "could not make a new mesh key"),
        }
    });
}

/// Makes a new key for `mesh` and gives it to every member; with `only_if_wanted`, only while the
/// broker still says one is wanted. The new epoch, or `None` when none was wanted any more.
pub async fn rotate(d: &Arc<Daemon>, mesh: MeshId, only_if_wanted: bool) -> Result<Option<u64>, RekeyError> {
    let lock = d.rekey_lock(&mesh);
    let _one_at_a_time = lock.lock().await;
    let me = d.member.identity.clone();
    for attempt in 1..=ATTEMPTS {
        let Some(link) = d.link(&mesh, &me.key()) else { return Err(RekeyError::Unreachable("no connection".into())) };
        let said = *link.key_state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if only_if_wanted && !said.is_some_and(|s| s.rekey_wanted) {
            return Ok(None);
        }
        let (row, members) =
            d.db.call(move |c| {
                let row = crate::meshes::get(c, &mesh)?;
                let members: Vec<crate::roster::PeerRow> = crate::roster::list(c, Some(&mesh))?
                    .into_iter()
                    .filter(|r| r.peer.kind == PeerKind::Member)
                    .collect();
                Ok((row, members))
            })
            .await?;
        let row = row.ok_or(RekeyError::NoMesh)?;
        if !row.role.is_admin() {
            return Err(RekeyError::NotAdmin(row.role.as_str()));
        }
        let epoch = said.map_or(0, |s| s.epoch).max(row.key_epoch) + 1;
        let key = GroupKey::generate();
        let now = now_ms();
        let grants: Vec<_> = members
            .iter()
            // A roster entry whose encryption key its identity did not sign gets no key.
            .filter(|m| m.peer.public_identity().verify().is_ok())
            .map(|m| mesh_proto::membership::grant(&me, mesh, epoch, &m.peer.public_identity(), &key, now))
            .collect();
        let frame = move |id| ClientFrame::RotateKey(RotateKeyRequest { id, epoch, grants });
        match link.request(frame, REQUEST_WAIT).await {
            Ok(_) => {
                let by = me.key();
                let kept = key.clone();
                d.db.call(move |c| {
                    let tx = c.transaction()?;
                    crate::keys::adopt(&tx, &mesh, epoch, &kept, &by, now, now)?;
                    tx.commit()
                })
                .await?;
                d.notify_changed();
                tracing::info!(%mesh, epoch, members = members.len(), "new mesh key given to every member");
                return Ok(Some(epoch));
            }
            Err(RequestError::Refused(e)) if e.code == ErrorCode::RotationConflict => {
                // The roster or the key moved under us (a member joined or left, another admin made a
                // key): what this daemon knows catches up within moments.
                tracing::info!(%mesh, attempt, why = %e.message, "new mesh key refused for now; again");
                tokio::time::sleep(Duration::from_millis(300 * u64::from(attempt))).await;
            }
            Err(RequestError::Refused(e)) => {
                return Err(RekeyError::Refused(format!("{}: {}", e.code.as_str(), e.message)));
            }
            Err(e @ RequestError::NotConnected) => return Err(RekeyError::Unreachable(e.to_string())),
        }
    }
    Err(RekeyError::Conflict)
}
