//! Agent sessions: `/v1/sessions` (launch, list), `/v1/session` (who am I), `/v1/session/end`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Json;
use mesh_ipc::api::*;
use mesh_proto::names;

use super::{Body, Caller, Failure, pick_mesh};
use crate::daemon::Daemon;
use crate::process;
use crate::sessions::{LaunchError, Session};

async fn info(d: &Daemon, s: &Session) -> Result<SessionInfo, Failure> {
    let mesh_id = s.mesh_id;
    let mesh = d.db.call(move |c| crate::meshes::get(c, &mesh_id)).await?;
    Ok(SessionInfo {
        name: s.name.clone(),
        mesh: mesh.map_or_else(|| s.mesh_id.to_string(), |m| m.name),
        key: s.key().to_string(),
        live: s.is_live(),
        pid: s.process.as_ref().filter(|_| s.is_live()).map(|p| p.pid),
        created_at: s.created_at,
        launched_at: s.launched_at,
        ended_at: s.ended_at,
        connection: s.is_live().then(|| d.link_status(&s.mesh_id, &s.key())),
    })
}

pub async fn launch(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<LaunchRequest>,
) -> Result<Json<LaunchResponse>, Failure> {
    names::validate_display(&req.name).map_err(|e| Failure::bad_request(e.to_string()))?;
    let mesh = pick_mesh(&d, req.mesh).await?;
    let proc = process::lookup(req.pid).ok_or_else(|| {
        Failure::bad_request(format!("process {} is not running; a session needs a live process", req.pid))
    })?;
    let session = d.launch_session(mesh, req.name, proc).await.map_err(|e| match e {
        LaunchError::NameTaken { .. } => Failure::new(ApiErrorCode::Conflict, e.to_string()),
        other => {
            tracing::error!(error = %mesh_proto::error::chain(&other), "launching a session");
            Failure::new(ApiErrorCode::Internal, mesh_proto::error::chain(&other))
        }
    })?;
    let token_file = session.token_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    Ok(Json(LaunchResponse { session: info(&d, &session).await?, token_file }))
}

pub async fn list(State(d): State<Arc<Daemon>>) -> Result<Json<Vec<SessionInfo>>, Failure> {
    let mut out = Vec::new();
    for s in d.sessions.all() {
        out.push(info(&d, &s).await?);
    }
    Ok(Json(out))
}

fn only_sessions(caller: Caller) -> Result<Arc<Session>, Failure> {
    match caller {
        Caller::Session(s) => Ok(s),
        Caller::Member => Err(Failure::new(
            ApiErrorCode::Unauthorized,
            "not a session: run inside `mesh launch` (MESH_SESSION_FILE is not set)".into(),
        )),
    }
}

pub async fn whoami(State(d): State<Arc<Daemon>>, caller: Caller) -> Result<Json<SessionInfo>, Failure> {
    let s = only_sessions(caller)?;
    Ok(Json(info(&d, &s).await?))
}

pub async fn end(State(d): State<Arc<Daemon>>, caller: Caller) -> Result<Json<SessionInfo>, Failure> {
    let s = only_sessions(caller)?;
    d.end_session(&s).await;
    let now = d.sessions.by_key(&s.key()).unwrap_or(s);
    Ok(Json(info(&d, &now).await?))
}
