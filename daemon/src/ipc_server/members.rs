//! Who belongs to a mesh, as the member asks: remove a member, leave, change a role, list and revoke
//! invites. Each change is signed by the member here and sent over its live connection; the broker
//! checks the rules against the roles as they are, and says why when it refuses.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Json;
use mesh_ipc::api::*;
use mesh_proto::membership::{ChangeKind, MembershipAction};
use mesh_proto::signed::Signed;
use mesh_proto::wire::{ClientFrame, MembershipRequest, PeerKind, Role};
use mesh_proto::{PublicKey, now_ms};

use super::meshes::{REQUEST_WAIT, online_link, request_failure};
use super::{Body, Caller, Failure, Params, pick_mesh};
use crate::daemon::Daemon;
use crate::drain::Answer;
use crate::meshes::MeshRow;
use crate::roster::{self, PeerRow};

/// The member `text` names in `mesh` (a name, a key prefix or a key, resolved as a send's target
/// is); a session is named by its member.
async fn member_of(d: &Daemon, mesh: &MeshRow, text: &str) -> Result<PeerRow, Failure> {
    let (scope, me, text_owned) =
        (roster::Scope { meshes: vec![mesh.clone()], chosen_by: None }, d.member.identity.key(), text.to_owned());
    let mesh_id = mesh.id;
    let found =
        d.db.call(move |c| {
            Ok(match roster::resolve(c, &text_owned, &scope, &me) {
                Ok(r) => match r.target {
                    mesh_proto::Target::Key(key) => Ok(roster::get(c, &mesh_id, &key)?),
                    _ => Err(Failure::bad_request("name one member: a name, a key prefix or a key")),
                },
                Err(crate::roster::ResolveError::Ambiguous(miss)) => {
                    let example = miss.candidates.first().map(|c| c.key.chars().take(8).collect::<String>());
                    let failure = Failure::from(crate::roster::ResolveError::Ambiguous(miss));
                    Err(match example {
                        Some(prefix) => {
                            failure.with_hint(format!("name the member by the key prefix shown, e.g. {prefix}"))
                        }
                        None => failure,
                    })
                }
                Err(e) => Err(Failure::from(e)),
            })
        })
        .await??;
    let Some(row) = found else { return Err(Failure::bad_request(format!("{text:?} left the roster meanwhile"))) };
    if row.peer.kind == PeerKind::Session {
        return Err(Failure::bad_request(format!(
            "{} ({}) is a session; name its member ({}), whose sessions go with it",
            row.peer.name,
            row.peer.key.short(),
            row.peer.member.short()
        )));
    }
    Ok(row)
}

/// Signs `kind` of `target` as the member and sends it over the mesh's live connection.
async fn change(
    d: &Daemon,
    mesh: &MeshRow,
    kind: ChangeKind,
    target: PublicKey,
    role: Option<Role>,
    doing: &str,
) -> Result<(), Failure> {
    let link = online_link(d, mesh, doing).await?;
    let action =
        MembershipAction { v: 1, mesh_id: mesh.id, kind, target, role, by: d.member.identity.key(), at: now_ms() };
    let action = Signed::sign(&d.member.identity, &action);
    let frame = move |id| ClientFrame::Membership(MembershipRequest { id, action });
    link.request(frame, REQUEST_WAIT).await.map_err(|e| request_failure(mesh, doing, e))?;
    Ok(())
}

pub async fn remove(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<RemoveRequest>,
) -> Result<Json<MemberChange>, Failure> {
    caller.member_only("removing a member")?;
    let mesh = pick_mesh(&d, req.mesh).await?;
    let target = member_of(&d, &mesh, &req.member).await?;
    if target.peer.key == d.member.identity.key() {
        return Err(Failure::bad_request("that is you; to take yourself out of the mesh, `mesh leave`"));
    }
    change(&d, &mesh, ChangeKind::Remove, target.peer.key, None, "removing a member").await?;
    tracing::info!(mesh = %mesh.name, member = %target.peer.key, "member removed");
    // The removed member holds the mesh's key: the others get a new one now.
    let (key_epoch, warning) = match crate::rekey::rotate(&d, mesh.id, false).await {
        Ok(epoch) => (epoch, None),
        Err(e) => (
            None,
            Some(format!(
                "the mesh key was not replaced yet ({e}); the broker asks the owner's and admins' daemons to, or run `mesh mesh rotate-key`"
            )),
        ),
    };
    Ok(Json(MemberChange {
        mesh: mesh.name,
        change: ChangeKind::Remove.as_str().into(),
        key: target.peer.key.to_string(),
        name: target.peer.name,
        role: None,
        key_epoch,
        warning,
    }))
}

pub async fn leave(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<LeaveRequest>,
) -> Result<Json<MemberChange>, Failure> {
    caller.member_only("leaving a mesh")?;
    let mesh = pick_mesh(&d, req.mesh).await?;
    if mesh.embedded {
        return Err(Failure::bad_request(format!(
            "{:?} is this machine's own local mesh: there is nobody to leave it to",
            mesh.name
        )));
    }
    let me = d.member.identity.key();
    // Removed already (the broker refuses this member), or asked to forget only: there is nothing to
    // tell the broker; the mesh is forgotten here.
    let forget_only = req.forget || super::meshes::removed_from(&d, &mesh);
    if !forget_only {
        change(&d, &mesh, ChangeKind::Leave, me, None, "leaving the mesh").await.map_err(|f| {
            if f.code() == ApiErrorCode::BrokerUnreachable {
                f.with_hint(format!(
                    "try again once the mesh is online; if its broker is gone for good, `mesh leave --forget --mesh {}` forgets it here",
                    mesh.name
                ))
            } else {
                f
            }
        })?;
    }
    d.forget_mesh(&mesh.id).await?;
    let change = if forget_only { "forget" } else { ChangeKind::Leave.as_str() };
    Ok(Json(own_change(&d, &mesh, change)))
}

/// What a change the member made to its own place in `mesh` (leaving, forgetting, deleting) did.
fn own_change(d: &Daemon, mesh: &MeshRow, change: &str) -> MemberChange {
    MemberChange {
        mesh: mesh.name.clone(),
        change: change.to_owned(),
        key: d.member.identity.key().to_string(),
        name: mesh.display_name(&d.member.name).to_owned(),
        role: None,
        key_epoch: None,
        warning: None,
    }
}

pub async fn role(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<RoleRequest>,
) -> Result<Json<MemberChange>, Failure> {
    caller.member_only("changing a role")?;
    let mesh = pick_mesh(&d, req.mesh).await?;
    let target = member_of(&d, &mesh, &req.member).await?;
    change(&d, &mesh, ChangeKind::SetRole, target.peer.key, Some(req.role), "changing a role").await?;
    tracing::info!(mesh = %mesh.name, member = %target.peer.key, role = req.role.as_str(), "role changed");
    Ok(Json(MemberChange {
        mesh: mesh.name,
        change: ChangeKind::SetRole.as_str().into(),
        key: target.peer.key.to_string(),
        name: target.peer.name,
        role: Some(req.role),
        key_epoch: None,
        warning: None,
    }))
}

/// The owner deletes the mesh at its broker (every member is cut off, everything of it is gone there),
/// then here.
pub async fn delete_mesh(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<LeaveRequest>,
) -> Result<Json<MemberChange>, Failure> {
    caller.member_only("deleting a mesh")?;
    let mesh = pick_mesh(&d, req.mesh).await?;
    if mesh.embedded {
        return Err(Failure::bad_request(format!(
            "{:?} is this machine's own local mesh; it is not deleted",
            mesh.name
        )));
    }
    let me = d.member.identity.key();
    change(&d, &mesh, ChangeKind::DeleteMesh, me, None, "deleting the mesh").await?;
    d.forget_mesh(&mesh.id).await?;
    tracing::info!(mesh = %mesh.name, "mesh deleted");
    Ok(Json(own_change(&d, &mesh, ChangeKind::DeleteMesh.as_str())))
}

/// A new mesh key, given to every member now (an owner or admin).
pub async fn rotate_key(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<mesh_ipc::api::RotateKeyRequest>,
) -> Result<Json<KeyRotated>, Failure> {
    caller.member_only("making a new mesh key")?;
    let mesh = pick_mesh(&d, req.mesh).await?;
    online_link(&d, &mesh, "making a new mesh key").await?;
    match crate::rekey::rotate(&d, mesh.id, false).await {
        Ok(Some(epoch)) => Ok(Json(KeyRotated { mesh: mesh.name, key_epoch: epoch })),
        Ok(None) => Err(Failure::new(ApiErrorCode::Internal, "no key was made".into())),
        Err(crate::rekey::RekeyError::NotAdmin(role)) => Err(Failure::new(
            ApiErrorCode::Forbidden,
            format!("only the mesh's owner and admins make a new key; you are a {role} of {}", mesh.name),
        )),
        Err(e @ crate::rekey::RekeyError::Unreachable(_)) => {
            Err(Failure::new(ApiErrorCode::BrokerUnreachable, e.to_string()))
        }
        Err(e) => Err(Failure::new(ApiErrorCode::BrokerRefused, e.to_string())),
    }
}

/// The mesh's invites, as its broker lists them, newest first.
pub async fn invites(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Params(q): Params<InvitesQuery>,
) -> Result<Json<Vec<InviteInfo>>, Failure> {
    caller.member_only("listing invites")?;
    let mesh = pick_mesh(&d, q.mesh).await?;
    let link = online_link(&d, &mesh, "listing invites").await?;
    let frame = |id| ClientFrame::Invites(mesh_proto::wire::InvitesRequest { id });
    let listed = match link.request(frame, REQUEST_WAIT).await {
        Ok(Answer::Invites(list)) => list,
        Ok(Answer::Ok) => {
            return Err(Failure::new(ApiErrorCode::Internal, "the broker answered without a list".into()));
        }
        Err(e) => return Err(request_failure(&mesh, "listing invites", e)),
    };
    let id = mesh.id;
    let names = d.db.call(move |c| roster::list(c, Some(&id))).await?;
    let name_of = |key: &PublicKey| names.iter().find(|r| r.peer.key == *key).map(|r| r.peer.name.clone());
    // An invite works only while its issuer is an owner or admin of the mesh.
    let may_invite = |key: &PublicKey| names.iter().any(|r| r.peer.key == *key && r.peer.role.is_admin());
    let now = now_ms();
    let out = listed
        .into_iter()
        .map(|i| {
            let state = if i.revoked_at.is_some() {
                "revoked"
            } else if !may_invite(&i.issued_by) {
                "issuer_not_admin"
            } else if i.expires_at <= now {
                "expired"
            } else if i.max_uses.is_some_and(|m| i.uses >= m) {
                "used_up"
            } else {
                "open"
            };
            InviteInfo {
                id: i.invite_id,
                mesh: mesh.name.clone(),
                issued_by: i.issued_by.to_string(),
                issued_by_name: name_of(&i.issued_by),
                role: i.role,
                issued_at: i.issued_at,
                expires_at: i.expires_at,
                max_uses: i.max_uses,
                uses: i.uses,
                state: state.into(),
                revoked_at: i.revoked_at,
                revoked_by: i.revoked_by.map(|k| k.to_string()),
            }
        })
        .collect();
    Ok(Json(out))
}

pub async fn revoke_invite(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<RevokeInviteRequest>,
) -> Result<Json<serde_json::Value>, Failure> {
    caller.member_only("revoking an invite")?;
    let mesh = pick_mesh(&d, req.mesh).await?;
    let id = req.id.trim().to_ascii_lowercase();
    if id.len() != 32 || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Failure::bad_request(format!(
            "{:?} is not an invite id (32 hex digits, as `mesh invites` lists them)",
            req.id
        )));
    }
    let link = online_link(&d, &mesh, "revoking an invite").await?;
    let asked = id.clone();
    let frame =
        move |rid| ClientFrame::RevokeInvite(mesh_proto::wire::RevokeInviteRequest { id: rid, invite_id: asked });
    match link.request(frame, REQUEST_WAIT).await {
        Ok(_) => {}
        Err(crate::link::RequestError::Refused(e)) if e.code == mesh_proto::wire::ErrorCode::InviteInvalid => {
            return Err(Failure::not_found(format!("mesh {} has no invite {id}", mesh.name)).with_hint("mesh invites"));
        }
        Err(e) => return Err(request_failure(&mesh, "revoking an invite", e)),
    }
    tracing::info!(mesh = %mesh.name, invite = %id, "invite revoked");
    Ok(Json(serde_json::json!({ "mesh": mesh.name, "id": id, "revoked": true })))
}
