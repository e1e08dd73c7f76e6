//! Membership changes the broker tells every member of (a member removed, a member leaving, a role
//! changed): the roster and the mesh's role here follow them, and each is an event for the mesh.

use mesh_ipc::api::{EventBody, MembershipEvent};
use mesh_proto::membership::{ChangeKind, MembershipAction};
use mesh_proto::wire::{MembershipNotice, Role};
use mesh_proto::{MeshId, PublicKey};
use rusqlite::{Connection, params};

use crate::events;

/// Whether the notice carries its maker's signature over exactly this change.
fn signed(mesh: &MeshId, n: &MembershipNotice) -> bool {
    n.action.open::<MembershipAction>().is_ok_and(|a| {
        a.by == n.by && a.mesh_id == *mesh && a.kind == n.kind && a.target == n.target && a.role == n.role
    })
}

/// Applies a notice to this daemon's copy of the mesh (`member` is this daemon's member), and appends
/// its event; inside the transaction that takes the delivery.
pub fn apply(
    conn: &Connection,
    mesh: &MeshId,
    member: &PublicKey,
    n: &MembershipNotice,
    now: u64,
) -> rusqlite::Result<()> {
    let (mesh_s, target) = (mesh.to_string(), n.target.to_string());
    match n.kind {
        // No notice is queued for a deleted mesh (its queues go with it); one would change nothing.
        ChangeKind::DeleteMesh => {}
        ChangeKind::Remove | ChangeKind::Leave => {
            conn.execute(
                "DELETE FROM peers WHERE mesh_id = ?1 AND (key = ?2 OR (kind = 'session' AND member = ?2))",
                params![mesh_s, target],
            )?;
        }
        ChangeKind::SetRole => {
            let role = n.role.unwrap_or(Role::Member);
            set_role(conn, mesh, &n.target, member, role)?;
            if role == Role::Owner {
                // The owner who handed ownership over is an admin now.
                set_role(conn, mesh, &n.by, member, Role::Admin)?;
            }
        }
    }
    let event = EventBody::Membership(MembershipEvent {
        change: n.kind.as_str().to_owned(),
        key: target,
        name: n.target_name.clone(),
        by: n.by.to_string(),
        by_name: n.by_name.clone(),
        role: n.role,
        at: n.at,
        signed: signed(mesh, n),
        key_epoch: None,
    });
    events::append(conn, Some(mesh), None, &event, now)?;
    Ok(())
}

fn set_role(conn: &Connection, mesh: &MeshId, key: &PublicKey, member: &PublicKey, role: Role) -> rusqlite::Result<()> {
    conn.execute(
        "UPDATE peers SET role = ?3 WHERE mesh_id = ?1 AND key = ?2",
        params![mesh.to_string(), key.to_string(), role.as_str()],
    )?;
    if key == member {
        conn.execute("UPDATE meshes SET role = ?2 WHERE id = ?1", params![mesh.to_string(), role.as_str()])?;
    }
    Ok(())
}
