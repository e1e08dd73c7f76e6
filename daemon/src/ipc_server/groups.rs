//! Groups: `/v1/groups`, `/v1/groups/join`, `/v1/groups/leave`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Json;
use mesh_ipc::api::{GroupChange, GroupInfo};
use mesh_proto::names;

use super::{Body, Caller, Failure, own_mesh, pick_mesh};
use crate::daemon::Daemon;
use crate::groups;

async fn change(
    d: &Arc<Daemon>,
    caller: &Caller,
    req: GroupChange,
    join: bool,
) -> Result<Json<Vec<GroupInfo>>, Failure> {
    let name = req.group.strip_prefix('@').unwrap_or(&req.group).to_owned();
    names::validate_group(&name).map_err(|e| Failure::bad_request(e.to_string()))?;
    let mesh = match caller {
        Caller::Session(s) => own_mesh(d, s, req.mesh.as_deref()).await?.id,
        Caller::Member => pick_mesh(d, req.mesh).await?.id,
    };
    let key = caller.key(d);
    let (g, m) = (name.clone(), mesh);
    let member = d.db.call(move |c| groups::is_in(c, &m, &key, &g)).await?;
    if !join && !member {
        return Err(Failure::not_found(format!("you are not in @{name}; nothing to leave")));
    }
    d.db.call(move |c| groups::want(c, &mesh, &key, &name, join)).await?;
    d.wake_drain(&mesh, &key);
    list(State(d.clone()), caller.clone()).await
}

pub async fn join(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<GroupChange>,
) -> Result<Json<Vec<GroupInfo>>, Failure> {
    change(&d, &caller, req, true).await
}

pub async fn leave(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<GroupChange>,
) -> Result<Json<Vec<GroupInfo>>, Failure> {
    change(&d, &caller, req, false).await
}

/// The caller's memberships (the member's, or a session's own).
pub async fn list(State(d): State<Arc<Daemon>>, caller: Caller) -> Result<Json<Vec<GroupInfo>>, Failure> {
    let key = caller.key(&d);
    let rows = d.db.call(move |c| groups::list(c, Some(&key))).await?;
    let meshes = d.db.call(|c| crate::meshes::list(c)).await?;
    Ok(Json(
        rows.into_iter()
            .map(|m| GroupInfo {
                group: m.name,
                mesh: meshes.iter().find(|x| x.id == m.mesh).map_or_else(|| m.mesh.to_string(), |x| x.name.clone()),
                key: m.key.to_string(),
                joined: m.joined,
                synced: m.synced,
            })
            .collect(),
    ))
}
