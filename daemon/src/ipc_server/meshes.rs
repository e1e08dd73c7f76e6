//! Meshes, invites and rosters: `/v1/meshes`, `/v1/meshes/join`, `/v1/invites`, `/v1/peers`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Json;
use mesh_ipc::api::*;
use mesh_proto::crypto::GroupKey;
use mesh_proto::invite::{InviteParams, InviteToken};
use mesh_proto::wire::{Intent, Role};
use mesh_proto::{MeshId, names};

use super::{Body, Failure, Params, pick_mesh};
use crate::clock::now_ms;
use crate::daemon::Daemon;
use crate::link;
use crate::meshes::MeshRow;
use crate::roster;

const DEFAULT_INVITE_SECS: u64 = 24 * 60 * 60;

pub async fn list(State(d): State<Arc<Daemon>>) -> Result<Json<Vec<MeshInfo>>, Failure> {
    let rows = d.db.call(|c| crate::meshes::list(c)).await?;
    Ok(Json(rows.iter().map(MeshRow::info).collect()))
}

pub async fn create(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<CreateMeshRequest>,
) -> Result<Json<MeshInfo>, Failure> {
    names::validate_display(&req.name).map_err(|e| Failure::bad_request(e.to_string()))?;
    link::ws_endpoint(&req.broker).map_err(Failure::bad_request)?;
    let name = req.name.clone();
    if d.db.call(move |c| crate::meshes::name_taken(c, &name)).await? {
        return Err(Failure::new(ApiErrorCode::Conflict, format!("a mesh named {:?} already exists here", req.name)));
    }
    let mesh_id = MeshId::generate();
    let intent = Intent::Create { mesh_name: req.name.clone(), create_token: req.create_token.clone() };
    let member = &d.member;
    let (_ws, welcome) =
        link::handshake(&req.broker, &member.identity, &member.name, mesh_id, None, |_| intent).await?;
    let row = MeshRow {
        id: mesh_id,
        name: req.name,
        broker_url: req.broker,
        role: Role::Owner,
        group_key: GroupKey::generate(),
        embedded: false,
        joined_at: now_ms(),
    };
    store_and_attach(&d, row, welcome.roster).await
}

async fn store_and_attach(
    d: &Arc<Daemon>,
    row: MeshRow,
    peers: Vec<mesh_proto::wire::Peer>,
) -> Result<Json<MeshInfo>, Failure> {
    let stored = row.clone();
    d.db.call(move |c| {
        crate::meshes::insert(c, &stored)?;
        roster::replace(c, &stored.id, &peers)
    })
    .await?;
    tracing::info!(mesh = %row.name, id = %row.id, "mesh added");
    d.attach_mesh(&row);
    Ok(Json(row.info()))
}

pub async fn join(State(d): State<Arc<Daemon>>, Body(req): Body<JoinMeshRequest>) -> Result<Json<MeshInfo>, Failure> {
    let token = InviteToken::decode(&req.token).map_err(|e| Failure::bad_request(e.to_string()))?;
    let claims = token.claims.clone();
    let group_key = token.group_key().map_err(|e| Failure::bad_request(format!("invite token: {e}")))?;
    let mesh_id = claims.mesh_id;
    if let Some(existing) = d.db.call(move |c| crate::meshes::get(c, &mesh_id)).await? {
        return Ok(Json(existing.info()));
    }
    if let Some(name) = &req.name {
        names::validate_display(name).map_err(|e| Failure::bad_request(e.to_string()))?;
        let n = name.clone();
        if d.db.call(move |c| crate::meshes::name_taken(c, &n)).await? {
            return Err(Failure::new(ApiErrorCode::Conflict, format!("a mesh named {name:?} already exists here")));
        }
    }
    let member = &d.member;
    let invite = token.invite.clone();
    let key = member.identity.key();
    let (_ws, welcome) =
        link::handshake(&claims.broker_url, &member.identity, &member.name, mesh_id, None, |challenge| Intent::Join {
            invite,
            proof: token.prove(challenge, &key),
        })
        .await?;
    let wanted = req.name.unwrap_or(claims.mesh_name.clone());
    let name = d.db.call(move |c| crate::meshes::free_name(c, &wanted)).await?;
    let row = MeshRow {
        id: mesh_id,
        name,
        broker_url: claims.broker_url,
        role: welcome.you.role,
        group_key,
        embedded: false,
        joined_at: now_ms(),
    };
    store_and_attach(&d, row, welcome.roster).await
}

pub async fn invite(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<CreateInviteRequest>,
) -> Result<Json<InviteResponse>, Failure> {
    let mesh = pick_mesh(&d, req.mesh).await?;
    if !mesh.role.can_invite() {
        return Err(Failure::new(
            ApiErrorCode::BadRequest,
            format!("you are a {} of {:?}; only its owner or an admin can invite", mesh.role.as_str(), mesh.name),
        ));
    }
    let role = req.role.unwrap_or(Role::Member);
    if role == Role::Owner {
        return Err(Failure::bad_request("an invite cannot make an owner; use --role member or admin"));
    }
    let secs = req.expires_in_secs.unwrap_or(DEFAULT_INVITE_SECS);
    if secs == 0 {
        return Err(Failure::bad_request("an invite must be valid for at least a second"));
    }
    let max_uses = match req.max_uses.unwrap_or(1) {
        0 => None,
        n => Some(n),
    };
    let now = now_ms();
    let params = InviteParams {
        mesh_id: mesh.id,
        mesh_name: mesh.name.clone(),
        broker_url: mesh.broker_url.clone(),
        role,
        issued_at: now,
        expires_at: now.saturating_add(secs.saturating_mul(1000)),
        max_uses,
    };
    let token = InviteToken::mint(&d.member.identity, params, &mesh.group_key);
    tracing::info!(mesh = %mesh.name, invite = %token.claims.invite_id, "invite minted");
    Ok(Json(InviteResponse {
        token: token.encode(),
        mesh: mesh.name,
        broker: mesh.broker_url,
        expires_at: token.claims.expires_at,
        max_uses,
        role,
    }))
}

pub async fn peers(
    State(d): State<Arc<Daemon>>,
    Params(q): Params<PeersQuery>,
) -> Result<Json<Vec<PeerInfo>>, Failure> {
    let mesh = match q.mesh {
        Some(m) => Some(pick_mesh(&d, Some(m)).await?),
        None => None,
    };
    let all = d.db.call(|c| crate::meshes::list(c)).await?;
    let mesh_id = mesh.map(|m| m.id);
    let rows = d.db.call(move |c| roster::list(c, mesh_id.as_ref())).await?;
    let me = d.member.identity.key();
    let name_of = |id: &MeshId| all.iter().find(|m| m.id == *id).map_or_else(|| id.to_string(), |m| m.name.clone());
    Ok(Json(rows.iter().map(|r| roster::peer_info(r, &name_of(&r.mesh_id), &me)).collect()))
}
