//! The IPC server: the routes of `mesh_ipc::routes` over HTTP/1.1 on the daemon's Unix socket.
//! Every failure is a JSON [`ApiError`] with a 4xx/5xx status; bad input never reaches a 500.

use std::sync::Arc;

use axum::Router;
use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::StatusCode;
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Json, Response};
use axum::routing::{get, post};
use mesh_ipc::api::*;
use mesh_ipc::{IPC_VERSION, MAX_BODY_BYTES, MAX_MESSAGE_BYTES, VERSION_HEADER, routes};
use mesh_proto::crypto::GroupKey;
use mesh_proto::invite::{InviteParams, InviteToken};
use mesh_proto::message::{self, Content, SealKey};
use mesh_proto::wire::{Intent, Role};
use mesh_proto::{MeshId, names, now_ms};
use serde::de::DeserializeOwned;
use sha2::Digest;

use crate::daemon::Daemon;
use crate::link::{self, LinkError};
use crate::meshes::{self, MeshRow};
use crate::roster::{self, ResolveError, SealWith};
use crate::{inbox, outbox};

const DEFAULT_INVITE_SECS: u64 = 24 * 60 * 60;
const MAX_CLIENT_MESSAGE_ID: usize = 128;

/// An error answer.
#[derive(Debug)]
pub struct Failure(pub ApiErrorCode, pub String);

impl Failure {
    fn bad_request(msg: impl Into<String>) -> Failure {
        Failure(ApiErrorCode::BadRequest, msg.into())
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.http_status()).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        (status, Json(ApiErrorBody { error: ApiError { code: self.0, message: self.1 } })).into_response()
    }
}

impl From<mesh_broker::sqlite::DbError> for Failure {
    fn from(e: mesh_broker::sqlite::DbError) -> Self {
        let detail = mesh_proto::error::chain(&e);
        tracing::error!(error = %detail, "database failure while serving a request");
        Failure(ApiErrorCode::Internal, format!("database failure: {detail}"))
    }
}

impl From<LinkError> for Failure {
    fn from(e: LinkError) -> Self {
        match e {
            LinkError::Unreachable { .. } => Failure(ApiErrorCode::BrokerUnreachable, e.to_string()),
            LinkError::Refused(_) => Failure(ApiErrorCode::BrokerRefused, e.to_string()),
            LinkError::Protocol(_) => Failure(ApiErrorCode::BrokerUnreachable, e.to_string()),
        }
    }
}

impl From<ResolveError> for Failure {
    fn from(e: ResolveError) -> Self {
        let code = match e {
            ResolveError::UnknownMesh(_) => ApiErrorCode::UnknownMesh,
            ResolveError::NoMeshes | ResolveError::Unknown(_) | ResolveError::BadBinding(_) => {
                ApiErrorCode::UnknownTarget
            }
            ResolveError::Ambiguous(_) => ApiErrorCode::AmbiguousTarget,
        };
        Failure(code, e.to_string())
    }
}

/// A JSON body whose rejections are [`Failure`]s.
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = Failure;

    async fn from_request(req: Request, state: &S) -> Result<Self, Failure> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(Body(v)),
            Err(r) => Err(json_rejection(r)),
        }
    }
}

fn json_rejection(r: JsonRejection) -> Failure {
    let code = match r.status().as_u16() {
        413 => ApiErrorCode::PayloadTooLarge,
        415 => ApiErrorCode::UnsupportedMediaType,
        _ => ApiErrorCode::BadRequest,
    };
    let message = match code {
        ApiErrorCode::PayloadTooLarge => format!("request body exceeds {MAX_BODY_BYTES} bytes"),
        ApiErrorCode::UnsupportedMediaType => "send the body as JSON with Content-Type: application/json".to_owned(),
        _ => format!("invalid JSON body: {}", r.body_text()),
    };
    Failure(code, message)
}

/// URL parameters whose rejections are [`Failure`]s.
pub struct Params<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequestParts<S> for Params<T> {
    type Rejection = Failure;

    async fn from_request_parts(parts: &mut axum::http::request::Parts, state: &S) -> Result<Self, Failure> {
        match axum::extract::Query::<T>::from_request_parts(parts, state).await {
            Ok(q) => Ok(Params(q.0)),
            Err(r) => Err(Failure::bad_request(format!("invalid query parameters: {}", query_detail(&r)))),
        }
    }
}

fn query_detail(r: &QueryRejection) -> String {
    r.body_text()
}

pub fn router(daemon: Arc<Daemon>) -> Router {
    Router::new()
        .route(routes::VERSION, get(version))
        .route(routes::STATUS, get(status))
        .route(routes::SHUTDOWN, post(shutdown))
        .route(routes::MESHES, get(list_meshes).post(create_mesh))
        .route(routes::MESHES_JOIN, post(join_mesh))
        .route(routes::INVITES, post(create_invite))
        .route(routes::PEERS, get(peers))
        .route(routes::SEND, post(send))
        .route(routes::INBOX, get(list_inbox))
        .route(routes::OUTBOX, get(list_outbox))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(check_version))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(daemon)
}

async fn check_version(req: Request, next: Next) -> Response {
    if let Some(v) = req.headers().get(VERSION_HEADER)
        && v.as_bytes() != IPC_VERSION.to_string().as_bytes()
    {
        return Failure(
            ApiErrorCode::VersionMismatch,
            format!(
                "the client speaks IPC v{}, this daemon v{IPC_VERSION}; restart the daemon after an upgrade \
                     (`mesh daemon down && mesh daemon up`)",
                String::from_utf8_lossy(v.as_bytes())
            ),
        )
        .into_response();
    }
    next.run(req).await
}

async fn not_found(req: Request) -> Failure {
    Failure(ApiErrorCode::NotFound, format!("no route {} {}; see docs/protocol.md", req.method(), req.uri().path()))
}

async fn method_not_allowed(req: Request) -> Failure {
    Failure(ApiErrorCode::MethodNotAllowed, format!("{} is not allowed on {}", req.method(), req.uri().path()))
}

async fn version() -> Json<VersionInfo> {
    Json(VersionInfo {
        version: env!("CARGO_PKG_VERSION").to_owned(),
        ipc: IPC_VERSION,
        protocol: mesh_proto::PROTOCOL_VERSION,
        pid: std::process::id(),
    })
}

async fn shutdown(State(d): State<Arc<Daemon>>) -> (StatusCode, Json<serde_json::Value>) {
    tracing::info!("shutdown requested over IPC");
    d.shutdown.cancel();
    (StatusCode::ACCEPTED, Json(serde_json::json!({ "status": "shutting_down" })))
}

async fn status(State(d): State<Arc<Daemon>>) -> Result<Json<Status>, Failure> {
    let rows =
        d.db.call(|c| {
            let mut out = Vec::new();
            for m in meshes::list(c)? {
                let peers = roster::list(c, Some(&m.id))?;
                let counts = outbox::counts(c, Some(&m.id))?;
                out.push((m, peers, counts));
            }
            Ok((out, outbox::counts(c, None)?, inbox::counts(c)?))
        })
        .await?;
    let (per_mesh, outbox, inbox) = rows;
    let me = d.member.identity.key();
    let meshes = per_mesh
        .into_iter()
        .map(|(m, peers, counts)| MeshStatus {
            id: m.id.to_string(),
            name: m.name.clone(),
            broker: m.broker_url.clone(),
            connection: d.link_status(&m.id, &me),
            peers_online: peers.iter().filter(|p| p.peer.online && p.peer.key != me).count() as u32,
            peers_total: peers.iter().filter(|p| p.peer.key != me).count() as u32,
            outbox: counts,
        })
        .collect();
    Ok(Json(Status {
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").to_owned(),
        socket: d.home.socket_path().display().to_string(),
        started_at: d.started_at,
        member: MemberInfo { key: me.to_string(), name: d.member.name.clone() },
        meshes,
        outbox,
        inbox,
        embedded_broker: d.embedded_broker.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
    }))
}

async fn list_meshes(State(d): State<Arc<Daemon>>) -> Result<Json<Vec<MeshInfo>>, Failure> {
    let rows = d.db.call(|c| meshes::list(c)).await?;
    Ok(Json(rows.iter().map(MeshRow::info).collect()))
}

async fn create_mesh(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<CreateMeshRequest>,
) -> Result<Json<MeshInfo>, Failure> {
    names::validate_display(&req.name).map_err(|e| Failure::bad_request(e.to_string()))?;
    link::ws_endpoint(&req.broker).map_err(Failure::bad_request)?;
    let name = req.name.clone();
    if d.db.call(move |c| meshes::name_taken(c, &name)).await? {
        return Err(Failure(ApiErrorCode::Conflict, format!("a mesh named {:?} already exists here", req.name)));
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
        meshes::insert(c, &stored)?;
        roster::replace(c, &stored.id, &peers)
    })
    .await?;
    tracing::info!(mesh = %row.name, id = %row.id, "mesh added");
    d.attach_mesh(&row);
    Ok(Json(row.info()))
}

async fn join_mesh(State(d): State<Arc<Daemon>>, Body(req): Body<JoinMeshRequest>) -> Result<Json<MeshInfo>, Failure> {
    let token = InviteToken::decode(&req.token).map_err(|e| Failure::bad_request(e.to_string()))?;
    let claims = token.claims.clone();
    let group_key = token.group_key().map_err(|e| Failure::bad_request(format!("invite token: {e}")))?;
    let mesh_id = claims.mesh_id;
    if let Some(existing) = d.db.call(move |c| meshes::get(c, &mesh_id)).await? {
        return Ok(Json(existing.info()));
    }
    if let Some(name) = &req.name {
        names::validate_display(name).map_err(|e| Failure::bad_request(e.to_string()))?;
        let n = name.clone();
        if d.db.call(move |c| meshes::name_taken(c, &n)).await? {
            return Err(Failure(ApiErrorCode::Conflict, format!("a mesh named {name:?} already exists here")));
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
    let name = d.db.call(move |c| meshes::free_name(c, &wanted)).await?;
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

/// The mesh a request names, or the only one there is.
async fn pick_mesh(d: &Daemon, mesh: Option<String>) -> Result<MeshRow, Failure> {
    let all = d.db.call(|c| meshes::list(c)).await?;
    match mesh {
        Some(m) => all
            .into_iter()
            .find(|row| row.name == m || row.id.to_string() == m)
            .ok_or_else(|| Failure(ApiErrorCode::UnknownMesh, format!("no mesh named {m:?}; see `mesh meshes`"))),
        None => match <[MeshRow; 1]>::try_from(all) {
            Ok([only]) => Ok(only),
            Err(all) if all.is_empty() => Err(Failure(
                ApiErrorCode::UnknownMesh,
                "not in any mesh yet; `mesh create` or `mesh join` first".into(),
            )),
            Err(all) => Err(Failure::bad_request(format!(
                "you are in {} meshes ({}); pass --mesh",
                all.len(),
                all.iter().map(|m| m.name.as_str()).collect::<Vec<_>>().join(", ")
            ))),
        },
    }
}

async fn create_invite(
    State(d): State<Arc<Daemon>>,
    Body(req): Body<CreateInviteRequest>,
) -> Result<Json<InviteResponse>, Failure> {
    let mesh = pick_mesh(&d, req.mesh).await?;
    if !mesh.role.can_invite() {
        return Err(Failure(
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

async fn peers(State(d): State<Arc<Daemon>>, Params(q): Params<PeersQuery>) -> Result<Json<Vec<PeerInfo>>, Failure> {
    let mesh = match q.mesh {
        Some(m) => Some(pick_mesh(&d, Some(m)).await?),
        None => None,
    };
    let all = d.db.call(|c| meshes::list(c)).await?;
    let mesh_id = mesh.map(|m| m.id);
    let rows = d.db.call(move |c| roster::list(c, mesh_id.as_ref())).await?;
    let me = d.member.identity.key();
    let name_of = |id: &MeshId| all.iter().find(|m| m.id == *id).map_or_else(|| id.to_string(), |m| m.name.clone());
    Ok(Json(rows.iter().map(|r| roster::peer_info(r, &name_of(&r.mesh_id), &me)).collect()))
}

/// The request fingerprint of a send, hex SHA-256 over its JSON array of fields (see docs/protocol.md).
fn send_fingerprint(req: &SendRequest, session: Option<&str>) -> String {
    let fields = serde_json::json!([req.to, req.mesh, req.body, session]);
    hex::encode(sha2::Sha256::digest(fields.to_string().as_bytes()))
}

async fn existing_send(d: &Daemon, id: i64, fingerprint: &str, stored: &str) -> Result<Json<SendResponse>, Failure> {
    if stored != fingerprint {
        return Err(Failure(
            ApiErrorCode::Conflict,
            "this client_message_id (idempotency key) was already used for a different message".into(),
        ));
    }
    let entry =
        d.db.call(move |c| outbox::entry(c, id))
            .await?
            .ok_or_else(|| Failure(ApiErrorCode::Internal, "row vanished".into()))?;
    Ok(Json(response_of(entry, true)))
}

fn response_of(e: OutboxEntry, duplicate: bool) -> SendResponse {
    SendResponse {
        outbox_id: e.id,
        client_message_id: e.client_message_id,
        status: e.status,
        mesh: e.mesh,
        target: e.target,
        duplicate,
    }
}

async fn send(State(d): State<Arc<Daemon>>, Body(req): Body<SendRequest>) -> Result<Json<SendResponse>, Failure> {
    let cmid = req.client_message_id.clone();
    if cmid.is_empty() || cmid.len() > MAX_CLIENT_MESSAGE_ID || cmid.chars().any(char::is_control) {
        return Err(Failure::bad_request("client_message_id must be 1-128 printable characters"));
    }
    if req.body.is_empty() {
        return Err(Failure::bad_request("the message is empty"));
    }
    if req.body.len() > MAX_MESSAGE_BYTES {
        return Err(Failure(ApiErrorCode::PayloadTooLarge, format!("the message exceeds {MAX_MESSAGE_BYTES} bytes")));
    }
    let fingerprint = send_fingerprint(&req, None);

    // Idempotency first: a resend is answered from the stored row, whatever the roster says now.
    let lookup_id = cmid.clone();
    if let Some((id, stored)) = d.db.call(move |c| outbox::lookup(c, &lookup_id)).await? {
        return existing_send(&d, id, &fingerprint, &stored).await;
    }

    let (to, mesh) = (req.to.clone(), req.mesh.clone());
    let resolved = d.db.call(move |c| Ok(roster::resolve(c, &to, mesh.as_deref()))).await??;
    let sender = &d.member.identity;
    let content = Content { body: req.body.clone(), reply_to: None };
    let sealed = match &resolved.seal {
        SealWith::Direct(enc) => {
            message::seal(sender, &resolved.mesh.id, &cmid, &resolved.target, SealKey::Direct(enc), &content)
        }
        SealWith::Group => message::seal(
            sender,
            &resolved.mesh.id,
            &cmid,
            &resolved.target,
            SealKey::Group(&resolved.mesh.group_key),
            &content,
        ),
    };
    let row = outbox::NewRow {
        client_message_id: cmid.clone(),
        fingerprint: fingerprint.clone(),
        mesh_id: resolved.mesh.id,
        sender: sender.key(),
        session: None,
        target: resolved.info.clone(),
        body: req.body,
        nonce: sealed.nonce,
        ciphertext: sealed.ciphertext,
        sig: sealed.sig,
    };
    let inserted = d.db.call(move |c| outbox::insert(c, &row, now_ms())).await?;
    let Some(id) = inserted else {
        // Another request with this id won the race: answer as a resend.
        let lookup_id = cmid.clone();
        let (id, stored) =
            d.db.call(move |c| outbox::lookup(c, &lookup_id))
                .await?
                .ok_or_else(|| Failure(ApiErrorCode::Internal, "row vanished".into()))?;
        return existing_send(&d, id, &fingerprint, &stored).await;
    };
    d.wake_drain(&resolved.mesh.id, &sender.key());
    let entry =
        d.db.call(move |c| outbox::entry(c, id))
            .await?
            .ok_or_else(|| Failure(ApiErrorCode::Internal, "row vanished".into()))?;
    Ok(Json(response_of(entry, false)))
}

async fn list_inbox(
    State(d): State<Arc<Daemon>>,
    Params(q): Params<InboxQuery>,
) -> Result<Json<Vec<InboxMessage>>, Failure> {
    let mesh = match &q.mesh {
        Some(m) => Some(pick_mesh(&d, Some(m.clone())).await?.id),
        None => None,
    };
    let recipients = vec![d.member.identity.key()];
    let rows = d.db.call(move |c| inbox::list(c, &recipients, mesh.as_ref(), &q)).await?;
    Ok(Json(rows))
}

async fn list_outbox(
    State(d): State<Arc<Daemon>>,
    Params(q): Params<OutboxQuery>,
) -> Result<Json<Vec<OutboxEntry>>, Failure> {
    Ok(Json(d.db.call(move |c| outbox::list(c, &q)).await?))
}
