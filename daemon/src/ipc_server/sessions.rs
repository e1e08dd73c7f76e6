//! Agent sessions: `/v1/sessions` (launch, list), `/v1/session` (who am I), `/v1/session/end`.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::response::Json;
use mesh_ipc::api::*;
use mesh_proto::names;
use mesh_proto::wire::ErrorCode;

use super::{Body, Caller, Failure, pick_mesh};
use crate::daemon::Daemon;
use crate::sessions::{LaunchError, Session};
use crate::{process, roster};

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

/// How long a launch waits for the session's first connection to the broker: long enough to report a
/// refusal (a name taken elsewhere in the mesh); a broker that is down does not stop the launch.
const FIRST_CONNECT_WAIT: Duration = Duration::from_secs(5);

pub async fn launch(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<LaunchRequest>,
) -> Result<Json<LaunchResponse>, Failure> {
    caller.member_only("launching a session")?;
    let name = names::normalize(&req.name);
    names::validate_display(&name).map_err(super::invalid_name)?;
    let mesh = pick_mesh(&d, req.mesh).await?;
    let proc = process::lookup(req.pid).ok_or_else(|| {
        Failure::bad_request(format!("process {} is not running; a session needs a live process", req.pid))
    })?;
    if req.resume
        && let Some(s) = d.sessions.live_named(&mesh.id, &name)
        && let Some(p) = s.process.as_ref().filter(|p| process::is_alive(p))
        && p.pid == req.pid
        && let Some(file) = &s.token_file
    {
        let token_file = file.display().to_string();
        return Ok(Json(LaunchResponse { session: info(&d, &s).await?, token_file }));
    }
    // The roster already shows someone else under this name (or one that looks the same): refuse now.
    let (mesh_id, wanted) = (mesh.id, name.clone());
    let holder =
        d.db.call(move |c| {
            let own: Option<String> = crate::sessions::key_of(c, &mesh_id, &wanted)?.map(|k| k.to_string());
            let keys = names::name_keys(&wanted);
            Ok(roster::list(c, Some(&mesh_id))?.into_iter().find(|r| {
                r.peer.ended_at.is_none()
                    && names::name_keys(&r.peer.name).collides(&keys)
                    && Some(r.peer.key.to_string()) != own
            }))
        })
        .await?;
    if let Some(h) = holder {
        return Err(name_taken(&name, &format!("{} {} ({})", h.peer.kind.as_str(), h.peer.name, h.peer.key.short())));
    }
    let session = d.launch_session(mesh, name.clone(), proc).await.map_err(|e| match e {
        LaunchError::NameTaken { .. } => Failure::new(ApiErrorCode::NameTaken, e.to_string()),
        other => {
            tracing::error!(error = %mesh_proto::error::chain(&other), "launching a session");
            Failure::new(ApiErrorCode::Internal, mesh_proto::error::chain(&other))
        }
    })?;
    // Wait for the broker's first answer: a refusal ends the launch with its reason.
    if let Some(link) = d.link(&session.mesh_id, &session.key()) {
        let mut status = link.status.clone();
        let settled = tokio::time::timeout(FIRST_CONNECT_WAIT, status.wait_for(|s| s.state != LinkState::Connecting))
            .await
            .ok()
            .and_then(|r| r.ok().map(|s| s.clone()));
        // Refused for good, or for now by a limit of the mesh: the launch fails with the reason
        // rather than running the command with a session that cannot connect. (A broker that is
        // merely unreachable is no refusal: the session runs and its sends wait in the outbox.)
        let why = settled.as_ref().and_then(|s| s.last_error.clone()).unwrap_or_default();
        let limited = [ErrorCode::TooManySessions, ErrorCode::TooManyConnections]
            .iter()
            .any(|code| why.contains(&format!("refused: {}:", code.as_str())));
        if let Some(s) = &settled
            && (s.state == LinkState::Rejected || limited)
        {
            d.end_session(&session).await;
            return Err(if why.starts_with(ErrorCode::NameTaken.as_str()) {
                Failure::new(ApiErrorCode::NameTaken, format!("session {name:?}: {why}"))
                    .with_hint("launch it under another name: mesh launch --name OTHER -- …")
            } else if let Some(certificate) = s.certificate.clone() {
                Failure::new(ApiErrorCode::CertificateRefused, format!("session {name:?} cannot connect: {why}"))
                    .with_hint("mesh doctor says what to do (mesh repin after a certificate changed)")
                    .with_certificate(Some(certificate))
            } else if limited {
                Failure::new(ApiErrorCode::BrokerRefused, format!("the broker refused session {name:?}: {why}"))
                    .with_hint("end a session of yours (`mesh session list`), or ask the mesh's owner (`mesh limits`)")
            } else {
                Failure::new(ApiErrorCode::BrokerRefused, format!("the broker refused session {name:?}: {why}"))
            });
        }
    }
    let token_file = session.token_file.as_ref().map(|p| p.display().to_string()).unwrap_or_default();
    Ok(Json(LaunchResponse { session: info(&d, &session).await?, token_file }))
}

fn name_taken(name: &str, holder: &str) -> Failure {
    Failure::new(ApiErrorCode::NameTaken, format!("the name {name:?} is taken in this mesh by {holder}"))
        .with_hint("launch it under another name: mesh launch --name OTHER -- …")
}

pub async fn list(State(d): State<Arc<Daemon>>, _caller: Caller) -> Result<Json<Vec<SessionInfo>>, Failure> {
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
