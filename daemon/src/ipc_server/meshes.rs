//! Meshes, invites, rosters, names and the context: `/v1/meshes`, `/v1/meshes/join`,
//! `/v1/meshes/rename`, `/v1/context`, `/v1/invites`, `/v1/peers`.

use std::sync::Arc;

use axum::extract::State;
use axum::response::Json;
use mesh_ipc::api::*;
use mesh_proto::crypto::GroupKey;
use mesh_proto::invite::{InviteParams, InviteToken};
use mesh_proto::pin::CertPin;
use mesh_proto::wire::{Intent, Role};
use mesh_proto::{MeshId, names};

use std::time::Duration;

use mesh_proto::wire::{ClientFrame, ErrorCode, RenameRequest as RenameFrame, SetLimitsRequest as SetLimitsFrame};

use super::{Body, Caller, Failure, Params, list_scope, own_mesh, pick_mesh};
use crate::clock::now_ms;
use crate::daemon::Daemon;
use crate::link::{self, LinkError, RequestError};
use crate::meshes::MeshRow;
use crate::roster;

const DEFAULT_INVITE_SECS: u64 = 24 * 60 * 60;
/// How long minting an invite waits to check a pinned broker's certificate.
const INVITE_CHECK: Duration = Duration::from_secs(3);
const MAX_INVITE_SECS: u64 = 366 * 24 * 60 * 60;

/// Any caller with a valid token (or none) may list; a presented token that is not valid is refused.
pub async fn list(State(d): State<Arc<Daemon>>, _caller: Caller) -> Result<Json<Vec<MeshInfo>>, Failure> {
    let (rows, context) = d.db.call(|c| Ok((crate::meshes::list(c)?, crate::meshes::context(c)?))).await?;
    Ok(Json(rows.iter().map(|m| info(&d, m, context.as_ref())).collect()))
}

fn info(d: &Daemon, m: &MeshRow, context: Option<&MeshId>) -> MeshInfo {
    MeshInfo { context: context == Some(&m.id), ..m.info(&d.member.name) }
}

/// A display name as typed: normalised, then checked against the naming rules.
fn display_name(typed: Option<String>, d: &Daemon) -> Result<String, Failure> {
    let name = names::normalize(typed.as_deref().unwrap_or(&d.member.name));
    names::validate_display(&name).map_err(super::invalid_name)?;
    Ok(name)
}

pub async fn create(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<CreateMeshRequest>,
) -> Result<Json<MeshInfo>, Failure> {
    caller.member_only("creating a mesh")?;
    let broker = link::address_list(&req.broker).map_err(Failure::bad_request)?;
    let req = CreateMeshRequest { broker, ..req };
    names::validate_display(&req.name).map_err(super::invalid_name)?;
    let pin =
        req.pin.as_deref().map(str::parse::<CertPin>).transpose().map_err(|e| Failure::bad_request(e.to_string()))?;
    if pin.is_some() && !req.broker.starts_with("wss://") {
        return Err(Failure::bad_request(format!("a pin is for a wss:// broker; {} is not TLS", req.broker)));
    }
    allowed_transport(&req.broker, req.insecure)?;
    let me = display_name(req.display_name.clone(), &d)?;
    let name = req.name.clone();
    if d.db.call(move |c| crate::meshes::name_taken(c, &name)).await? {
        return Err(Failure::new(ApiErrorCode::Conflict, format!("a mesh named {:?} already exists here", req.name)));
    }
    let mesh_id = MeshId::generate();
    let intent = Intent::Create { mesh_name: req.name.clone(), create_token: req.create_token.clone() };
    let broker = link::Broker { url: &req.broker, pin, mesh: &req.name };
    let (_ws, welcome) = match link::handshake(broker, &d.member.identity, &me, mesh_id, None, |_| intent).await {
        Ok(done) => done,
        Err(LinkError::Certificate(crate::tls::CertError::Changed { expected, got, .. })) => {
            return Err(Failure::new(
                ApiErrorCode::CertificateRefused,
                format!(
                    "the broker at {} presents {got}, not the pin given ({expected}); nothing was created",
                    req.broker
                ),
            )
            .with_hint("check the pin with the broker's operator (`mesh broker serve` prints it on start)")
            .with_certificate(Some(got)));
        }
        Err(e) => return Err(e.into()),
    };
    let row = MeshRow {
        id: mesh_id,
        name: req.name,
        broker_url: req.broker,
        role: Role::Owner,
        group_key: GroupKey::generate(),
        key_epoch: 0,
        embedded: false,
        joined_at: now_ms(),
        my_name: Some(me),
        tls_pin: pin,
    };
    store_and_attach(&d, row, welcome.roster).await
}

/// Whether the broker of `mesh` refuses this member as removed from it (`revoked`), or the mesh is
/// gone from it (its owner deleted it: `unknown_mesh`).
pub(super) fn removed_from(d: &Daemon, mesh: &MeshRow) -> bool {
    d.link(&mesh.id, &d.member.identity.key()).is_some_and(|l| {
        let s = l.status.borrow();
        s.state == LinkState::Rejected
            && s.last_error.as_deref().is_some_and(|e| {
                e.starts_with("revoked") || e.starts_with("unknown_mesh") || e.starts_with("unknown_member")
            })
    })
}

/// The refusal of what needs a mesh this member is no longer in.
pub(super) fn no_longer_in(d: &Daemon, mesh: &MeshRow) -> Failure {
    let why = d
        .link(&mesh.id, &d.member.identity.key())
        .and_then(|l| l.status.borrow().last_error.clone())
        .unwrap_or_else(|| "refused by its broker".into());
    let hint = if why.starts_with("unknown_mesh") {
        format!(
            "the mesh is gone from its broker (its owner deleted it, or the broker was restored from an older backup); `mesh leave --yes --mesh {}` forgets it here",
            mesh.name
        )
    } else {
        format!(
            "an invite made now lets you back in (mesh join TOKEN); `mesh leave --yes --mesh {}` forgets it here",
            mesh.name
        )
    };
    Failure::new(ApiErrorCode::Forbidden, format!("you are no longer in mesh {} ({why})", mesh.name)).with_hint(hint)
}

/// Plain `ws://` leaves this machine only when the caller accepts it.
fn allowed_transport(url: &str, insecure: bool) -> Result<(), Failure> {
    if link::unencrypted(url) && !insecure {
        return Err(Failure::new(
            ApiErrorCode::InsecureTransport,
            format!(
                "{url} is plain ws:// to another machine: who talks to whom, when and how much would be visible on \
                 the network (message bodies stay end-to-end encrypted)"
            ),
        )
        .with_hint("use the broker's wss:// address, or accept this with --insecure"));
    }
    Ok(())
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
    Ok(Json(row.info(&d.member.name)))
}

/// Names tried after the one asked for when it is taken and the caller allows a suffix.
const MAX_SUFFIX: u32 = 20;

pub async fn join(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<JoinMeshRequest>,
) -> Result<Json<MeshInfo>, Failure> {
    caller.member_only("joining a mesh")?;
    let token = InviteToken::decode(&req.token).map_err(|e| Failure::bad_request(e.to_string()))?;
    let claims = token.claims.clone();
    let group_key = token.group_key().map_err(|e| Failure::bad_request(format!("invite token: {e}")))?;
    let mesh_id = claims.mesh_id;
    let existing = d.db.call(move |c| crate::meshes::get(c, &mesh_id)).await?;
    if let Some(gone) = existing.as_ref().filter(|m| removed_from(&d, m)) {
        // Removed from the mesh (or left it elsewhere): this invite lets the member back in, afresh.
        tracing::info!(mesh = %gone.name, "joining again a mesh this member was removed from");
        d.forget_mesh(&gone.id).await?;
    } else if let Some(existing) = existing {
        let mut info = existing.info(&d.member.name);
        if let Some(asked) = req.display_name.as_deref().map(names::normalize).filter(|n| *n != info.my_name) {
            // Already a member: nothing joins, and the name asked for is not silently dropped.
            return Err(Failure::new(
                ApiErrorCode::Conflict,
                format!("you are already in mesh {} as {:?}; nothing was joined", info.name, info.my_name),
            )
            .with_hint(format!("to be {asked:?} there: mesh rename {asked:?} --mesh {}", info.name)));
        }
        // Nor is a way to the mesh asked for dropped without a word.
        if let Some(own) = &req.broker {
            let asked = link::address_list(own).map_err(|e| Failure::bad_request(format!("--broker: {e}")))?;
            if asked != existing.broker_url {
                return Err(Failure::new(
                    ApiErrorCode::Conflict,
                    format!(
                        "you are already in mesh {} through {}; nothing was joined and --broker was not applied",
                        info.name, existing.broker_url
                    ),
                ));
            }
        }
        info.context = false;
        return Ok(Json(info));
    }
    if let Some(name) = &req.mesh_name {
        names::validate_display(name).map_err(super::invalid_name)?;
        let n = name.clone();
        if d.db.call(move |c| crate::meshes::name_taken(c, &n)).await? {
            return Err(Failure::new(ApiErrorCode::Conflict, format!("a mesh named {name:?} already exists here")));
        }
    }
    let mut claims = claims;
    claims.broker_url = match &req.broker {
        // The joiner's own way to the mesh: an internal name, one replica.
        Some(own) => link::address_list(own).map_err(|e| Failure::bad_request(format!("--broker: {e}")))?,
        None => {
            link::address_list(&claims.broker_url).map_err(|e| Failure::bad_request(format!("invite token: {e}")))?
        }
    };
    allowed_transport(&claims.broker_url, req.insecure)
        .map_err(|f| f.with_hint("the broker is plain ws://; to join all the same: mesh join TOKEN --insecure"))?;
    let pin = claims.tls_pin.filter(|_| claims.broker_url.starts_with("wss://"));
    let asked = display_name(req.display_name.clone(), &d)?;
    let key = d.member.identity.key();
    let mut attempt = 1;
    // A replica that does not know the mesh (one started on another database by mistake) is passed
    // over for the next address, as a running link does.
    let addresses = link::addresses(&claims.broker_url).count();
    let mut first = 0;
    let (me, welcome) = loop {
        let me = if attempt == 1 { asked.clone() } else { format!("{asked}-{attempt}") };
        let invite = token.invite.clone();
        let order = link::rotated(&claims.broker_url, first);
        let broker = link::Broker { url: &order, pin, mesh: &claims.mesh_name };
        let joined = link::handshake(broker, &d.member.identity, &me, mesh_id, None, |challenge| Intent::Join {
            invite,
            proof: token.prove(challenge, &key),
        })
        .await;
        match joined {
            Ok((_ws, welcome)) => break (me, welcome),
            Err(LinkError::Refused(e)) if e.code == ErrorCode::UnknownMesh && first + 1 < addresses => {
                tracing::warn!(detail = %e.message, "a broker address does not know the mesh; trying the next");
                first += 1;
            }
            Err(LinkError::Refused(e)) if e.code == ErrorCode::UnknownMesh => {
                // Every address that answered refused; others may not have answered at all.
                return Err(Failure::new(
                    ApiErrorCode::BrokerRefused,
                    format!("the mesh is not on the broker at {}: {}", claims.broker_url, e.message),
                )
                .with_hint(
                    "an address on another database, or the right one down: check the mesh's addresses with its \
                     owner, or reach it through one you know (mesh join TOKEN --broker URL)",
                ));
            }
            Err(LinkError::Refused(e)) if e.code == ErrorCode::NameTaken => {
                if !req.suffix_if_taken || attempt > MAX_SUFFIX {
                    return Err(Failure::new(ApiErrorCode::NameTaken, e.message).with_hint(format!(
                        "join under another name: mesh join TOKEN --name NAME (for example {asked}-2)"
                    )));
                }
                attempt += 1;
            }
            Err(LinkError::Certificate(e @ crate::tls::CertError::Untrusted { .. })) => {
                // A joiner has nothing to pin with: the invite decides how the broker is verified.
                return Err(Failure::from(LinkError::Certificate(e)).with_hint(
                    "this machine does not trust the authority that signed the broker's certificate, and the \
                     invite carries no pin: trust that authority here (the daemon reads SSL_CERT_FILE), or ask \
                     the mesh's owner or an admin to pin the certificate (mesh repin --pin) and invite you again",
                ));
            }
            Err(LinkError::Certificate(crate::tls::CertError::Changed { expected, got, .. })) => {
                return Err(Failure::new(
                    ApiErrorCode::CertificateRefused,
                    format!(
                        "the broker presents {got}, not the certificate this invite names ({expected}); nothing was \
                         joined"
                    ),
                )
                .with_hint("the operator may have replaced it: ask for a new invite")
                .with_certificate(Some(got)));
            }
            Err(e) => return Err(e.into()),
        }
    };
    let taken = (me != asked).then_some(asked);
    // The inviter's name for the mesh, unless it breaks the rules here (an invite is an admin's word,
    // not a name check): then one made of its id.
    let invited = names::normalize(&claims.mesh_name);
    let invited =
        if names::validate_display(&invited).is_ok() { invited } else { format!("mesh-{}", &mesh_id.to_string()[..8]) };
    let wanted = req.mesh_name.unwrap_or(invited);
    let name = d.db.call(move |c| crate::meshes::free_name(c, &wanted)).await?;
    let row = MeshRow {
        id: mesh_id,
        name,
        broker_url: claims.broker_url,
        role: welcome.you.role,
        group_key,
        key_epoch: claims.key_epoch,
        embedded: false,
        joined_at: now_ms(),
        my_name: Some(me),
        tls_pin: pin,
    };
    let Json(info) = store_and_attach(&d, row, welcome.roster).await?;
    Ok(Json(MeshInfo { name_was_taken: taken, ..info }))
}

/// How long a request over the member's link (a rename, a change of limits) waits for the broker's
/// answer.
pub(super) const REQUEST_WAIT: Duration = Duration::from_secs(10);

fn broker_unreachable(mesh: &MeshRow, doing: &str, why: &str) -> Failure {
    Failure::new(ApiErrorCode::BrokerUnreachable, format!("{doing} needs the broker of mesh {}: {why}", mesh.name))
        .with_hint("try again once `mesh daemon status` shows the mesh online")
}

/// How long a request that needs the broker waits for the member's link to come online (a daemon
/// just started, a reconnect under way).
const ONLINE_WAIT: Duration = Duration::from_secs(5);

/// The member's link to `mesh`'s broker once it is online (waiting a moment for it): requests that
/// change the mesh go over it.
pub(super) async fn online_link(d: &Daemon, mesh: &MeshRow, doing: &str) -> Result<link::LinkHandle, Failure> {
    if removed_from(d, mesh) {
        return Err(no_longer_in(d, mesh));
    }
    let Some(link) = d.link(&mesh.id, &d.member.identity.key()) else {
        return Err(broker_unreachable(mesh, doing, "no connection"));
    };
    let mut status = link.status.clone();
    let online = tokio::time::timeout(ONLINE_WAIT, status.wait_for(|s| s.state == LinkState::Online)).await;
    if !matches!(online, Ok(Ok(_))) {
        let (state, why) = {
            let s = link.status.borrow();
            (s.state, s.last_error.clone())
        };
        let said = match why {
            Some(why) => format!("the connection is {} ({why})", state.as_str()),
            None => format!("the connection is {}", state.as_str()),
        };
        return Err(broker_unreachable(mesh, doing, &said));
    }
    Ok(link)
}

/// A request over a link that did not succeed, as the caller is told: the broker's `forbidden` as
/// `forbidden`, with its reason.
pub(super) fn request_failure(mesh: &MeshRow, doing: &str, e: RequestError) -> Failure {
    match e {
        RequestError::Refused(e) if e.code == ErrorCode::Forbidden => Failure::new(ApiErrorCode::Forbidden, e.message),
        RequestError::Refused(e) => {
            Failure::new(ApiErrorCode::BrokerRefused, format!("{}: {}", e.code.as_str(), e.message))
        }
        RequestError::NotConnected => broker_unreachable(mesh, doing, "the connection was lost"),
    }
}

/// The member's display name in one mesh, changed at the broker (which refuses a taken name) over
/// the live connection, then here; no reconnect, no restart.
pub async fn rename(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<RenameRequest>,
) -> Result<Json<MeshInfo>, Failure> {
    caller.member_only("renaming")?;
    let mesh = pick_mesh(&d, req.mesh).await?;
    let name = display_name(Some(req.name), &d)?;
    let me = d.member.identity.key();
    let link = online_link(&d, &mesh, "renaming").await?;
    let wanted = name.clone();
    match link.request(move |id| ClientFrame::Rename(RenameFrame { id, name: wanted }), REQUEST_WAIT).await {
        Ok(_) => {}
        Err(RequestError::Refused(e)) if e.code == ErrorCode::NameTaken => {
            return Err(Failure::new(ApiErrorCode::NameTaken, e.message));
        }
        Err(e) => return Err(request_failure(&mesh, "renaming", e)),
    }
    *lock(&link.name) = name.clone();
    let (id, stored) = (mesh.id, name.clone());
    let row =
        d.db.call(move |c| {
            crate::meshes::set_my_name(c, &id, &stored)?;
            c.execute(
                "UPDATE peers SET name = ?3 WHERE mesh_id = ?1 AND key = ?2",
                rusqlite::params![id.to_string(), me.to_string(), stored],
            )?;
            crate::meshes::get(c, &id)
        })
        .await?
        .ok_or_else(|| Failure::new(ApiErrorCode::UnknownMesh, "the mesh was removed meanwhile".into()))?;
    tracing::info!(mesh = %row.name, name = %name, "renamed");
    d.notify_changed();
    Ok(Json(row.info(&d.member.name)))
}

/// A mesh's limits as its broker announced them. A session sees its own mesh's.
pub async fn limits(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Params(q): Params<LimitsQuery>,
) -> Result<Json<MeshLimitsInfo>, Failure> {
    let mesh = match &caller {
        Caller::Session(s) => own_mesh(&d, s, q.mesh.as_deref()).await?,
        Caller::Member => pick_mesh(&d, q.mesh).await?,
    };
    let known =
        d.link(&mesh.id, &d.member.identity.key()).and_then(|l| lock(&l.limits).as_ref().map(|l| (l.mesh, l.broker)));
    let Some((limits, broker)) = known else {
        return Err(broker_unreachable(&mesh, "knowing the limits", "not connected since the daemon started"));
    };
    let can_change = matches!(caller, Caller::Member) && mesh.role.is_admin();
    Ok(Json(MeshLimitsInfo { mesh: mesh.name, limits, broker, can_change }))
}

/// Changes a mesh's limits at its broker (which checks the role and the ranges), over the member's
/// live connection.
pub async fn set_limits(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<SetLimitsRequest>,
) -> Result<Json<MeshLimitsInfo>, Failure> {
    caller.member_only("changing a mesh's limits")?;
    let mesh = pick_mesh(&d, req.mesh.clone()).await?;
    if !mesh.role.is_admin() {
        return Err(Failure::new(
            ApiErrorCode::BadRequest,
            format!(
                "you are a {} of {:?}; only its owner or an admin can change its limits",
                mesh.role.as_str(),
                mesh.name
            ),
        ));
    }
    let link = online_link(&d, &mesh, "changing the limits").await?;
    let frame = SetLimitsFrame {
        id: 0,
        reset: req.reset,
        sessions_per_member: req.sessions_per_member,
        connections_per_member: req.connections_per_member,
        connections: req.connections,
    };
    let asked = frame.clone();
    if let Err(e) = link.request(move |id| ClientFrame::SetLimits(SetLimitsFrame { id, ..frame }), REQUEST_WAIT).await {
        return Err(request_failure(&mesh, "changing the limits", e));
    }
    // What is in force now follows from the answer: each value asked for, or on reset the
    // broker's, or what was in force.
    let mut announced = lock(&link.limits);
    let Some(known) = announced.as_mut() else {
        return Err(Failure::new(ApiErrorCode::Internal, "the link is online but has no limits".into()));
    };
    let now = &mut known.mesh;
    let broker = known.broker;
    let pick =
        |asked: Option<u32>, before: u32, reset_to: u32| asked.unwrap_or(if req.reset { reset_to } else { before });
    now.sessions_per_member = pick(asked.sessions_per_member, now.sessions_per_member, broker.sessions_per_member);
    now.connections_per_member =
        pick(asked.connections_per_member, now.connections_per_member, broker.connections_per_member);
    now.connections = pick(asked.connections, now.connections, broker.connections);
    let limits = *now;
    drop(announced);
    tracing::info!(mesh = %mesh.name, ?limits, "mesh limits changed");
    Ok(Json(MeshLimitsInfo { mesh: mesh.name, limits, broker, can_change: true }))
}

fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

pub async fn get_context(State(d): State<Arc<Daemon>>, _caller: Caller) -> Result<Json<Context>, Failure> {
    let mesh =
        d.db.call(|c| match crate::meshes::context(c)? {
            Some(id) => Ok(crate::meshes::get(c, &id)?.map(|m| m.name)),
            None => Ok(None),
        })
        .await?;
    Ok(Json(Context { mesh }))
}

/// `mesh use MESH` (or, with no mesh, forgetting the context).
pub async fn set_context(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<Context>,
) -> Result<Json<Context>, Failure> {
    caller.member_only("setting the mesh context (a session always acts in its own mesh)")?;
    let chosen = match &req.mesh {
        Some(m) => Some(pick_mesh(&d, Some(m.clone())).await?),
        None => None,
    };
    let id = chosen.as_ref().map(|m| m.id);
    d.db.call(move |c| crate::meshes::set_context(c, id.as_ref())).await?;
    Ok(Json(Context { mesh: chosen.map(|m| m.name) }))
}

pub async fn invite(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<CreateInviteRequest>,
) -> Result<Json<InviteResponse>, Failure> {
    // An invite carries the mesh key and admits a new member: the member's decision, not an agent's.
    caller.member_only("minting an invite")?;
    let mesh = pick_mesh(&d, req.mesh).await?;
    if removed_from(&d, &mesh) {
        return Err(no_longer_in(&d, &mesh));
    }
    if !mesh.role.is_admin() {
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
    if secs == 0 || secs > MAX_INVITE_SECS {
        return Err(Failure::bad_request("an invite is valid for 1 second to 366 days"));
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
        tls_pin: mesh.tls_pin,
        role,
        issued_at: now,
        expires_at: now.saturating_add(secs.saturating_mul(1000)),
        max_uses,
        key_epoch: mesh.key_epoch,
    };
    if let Some(pin) = mesh.tls_pin {
        // An invite whose pin the broker no longer passes would only send joiners away: the inviter
        // repins first. A broker that does not answer quickly is no reason not to invite.
        let check = link::check_certificate(&mesh.broker_url, Some(pin), &mesh.name);
        if let Ok(Ok(Err(why))) = tokio::time::timeout(INVITE_CHECK, check).await {
            return Err(Failure::new(
                ApiErrorCode::CertificateRefused,
                format!("no invite: with the mesh's pin, its broker is refused ({why})"),
            )
            .with_hint(format!(
                "mesh doctor says what to do: mesh repin --mesh {} once a new certificate is confirmed, or the \
                 operator renews one that expired",
                mesh.name
            ))
            .with_certificate(why.presented()));
        }
    }
    let token = InviteToken::mint(&d.member.identity, params, &mesh.group_key);
    // Registered at the broker before anyone can hold it, so that it is listed and can be revoked.
    let link = online_link(&d, &mesh, "minting an invite").await?;
    let signed = token.invite.clone();
    let register =
        move |id| ClientFrame::RegisterInvite(mesh_proto::wire::RegisterInviteRequest { id, invite: signed });
    link.request(register, REQUEST_WAIT).await.map_err(|e| request_failure(&mesh, "minting an invite", e))?;
    tracing::info!(mesh = %mesh.name, invite = %token.claims.invite_id, "invite minted");
    Ok(Json(InviteResponse {
        id: token.claims.invite_id.clone(),
        token: token.encode(),
        mesh: mesh.name,
        broker: mesh.broker_url,
        tls_pin: mesh.tls_pin.map(|p| p.to_string()),
        expires_at: token.claims.expires_at,
        max_uses,
        role,
    }))
}

pub async fn peers(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Params(q): Params<PeersQuery>,
) -> Result<Json<Vec<PeerInfo>>, Failure> {
    let mesh = match &caller {
        // A session sees the roster of its own mesh.
        Caller::Session(s) => Some(own_mesh(&d, s, q.mesh.as_deref()).await?.id),
        Caller::Member => list_scope(&d, q.mesh, q.all_meshes).await?.map(|m| m.id),
    };
    let all = d.db.call(|c| crate::meshes::list(c)).await?;
    let rows = d.db.call(move |c| roster::list(c, mesh.as_ref())).await?;
    let me = caller.key(&d);
    let name_of = |id: &MeshId| all.iter().find(|m| m.id == *id).map_or_else(|| id.to_string(), |m| m.name.clone());
    Ok(Json(rows.iter().map(|r| roster::peer_info(r, &name_of(&r.mesh_id), &me)).collect()))
}

/// The pin of a mesh's broker certificate: shown (no `pin`), changed to the certificate the broker
/// presents (which must be the one given, and must then pass), or dropped (`unpin`: the platform's
/// authorities must vouch for the broker).
pub async fn repin(
    State(d): State<Arc<Daemon>>,
    caller: Caller,
    Body(req): Body<RepinRequest>,
) -> Result<Json<RepinResponse>, Failure> {
    caller.member_only("changing a broker's certificate pin")?;
    let wanted =
        req.pin.as_deref().map(str::parse::<CertPin>).transpose().map_err(|e| Failure::bad_request(e.to_string()))?;
    if wanted.is_some() && req.unpin {
        return Err(Failure::bad_request("give a pin or ask to unpin, not both"));
    }
    let mesh = pick_mesh(&d, req.mesh).await?;
    if !mesh.broker_url.starts_with("wss://") {
        return Err(Failure::bad_request(format!(
            "mesh {} reaches its broker at {}: no TLS, no certificate to pin",
            mesh.name, mesh.broker_url
        )));
    }
    let (presented, verdict) = link::presented_certificate(&mesh.broker_url, &mesh.name).await?;
    let pin_refused = match mesh.tls_pin {
        Some(pin) => link::check_certificate(&mesh.broker_url, Some(pin), &mesh.name).await?.err(),
        None => None,
    };
    let presented_refused = if mesh.tls_pin == Some(presented) {
        pin_refused.clone()
    } else {
        link::check_certificate(&mesh.broker_url, Some(presented), &mesh.name).await?.err()
    };
    let answer = |pinned: bool| RepinResponse {
        mesh: mesh.name.clone(),
        broker: mesh.broker_url.clone(),
        presented: presented.to_string(),
        previous: mesh.tls_pin.map(|p| p.to_string()),
        pinned,
        trusted_by_platform: verdict.is_ok(),
        platform_refused: verdict.as_ref().err().map(ToString::to_string),
        pin_refused: pin_refused.as_ref().map(ToString::to_string),
        presented_refused: presented_refused.as_ref().map(ToString::to_string),
    };
    let refused =
        |message: String| Failure::new(ApiErrorCode::CertificateRefused, message).with_certificate(Some(presented));
    let id = mesh.id;
    if req.unpin {
        if let Err(why) = &verdict {
            return Err(refused(format!("without its pin the broker would be refused: {why}; nothing changed")));
        }
        d.db.call(move |c| crate::meshes::set_tls_pin(c, &id, None)).await?;
        d.repin(&mesh.id, None);
        tracing::info!(mesh = %mesh.name, previous = ?mesh.tls_pin, "broker certificate unpinned");
        return Ok(Json(answer(false)));
    }
    let Some(wanted) = wanted else {
        return Ok(Json(answer(mesh.tls_pin == Some(presented))));
    };
    if wanted != presented {
        return Err(refused(format!(
            "the broker at {} presents {presented}, not {wanted}; nothing changed",
            mesh.broker_url
        )));
    }
    // A real handshake with the new pin before it is kept: a pin that cannot work is never stored.
    if let Some(why) = &presented_refused {
        return Err(refused(format!("{why}; nothing changed")));
    }
    d.db.call(move |c| crate::meshes::set_tls_pin(c, &id, Some(&wanted))).await?;
    d.repin(&mesh.id, Some(wanted));
    tracing::info!(mesh = %mesh.name, pin = %wanted, previous = ?mesh.tls_pin, "broker certificate pinned");
    Ok(Json(answer(true)))
}
