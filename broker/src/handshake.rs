//! Checking a `hello` against this connection's challenge and the store: who is connecting, to which
//! mesh, with what right. Every refusal is a typed, permanent error frame.

use mesh_proto::attestation::{MAX_ATTESTATION_MS, SessionAttestation};
use mesh_proto::invite::{self, InviteClaims};
use mesh_proto::wire::{ErrorCode, ErrorFrame, Hello, HelloClaims, Intent, PeerKind, Role};
use mesh_proto::{MeshId, ProtoError, PublicKey, codec, names, now_ms};

use crate::config::BrokerConfig;
use crate::store::{Claimed, InviteRecord, JoinOutcome, MeshRecord, PeerRecord, Store, StoreError};

/// A connection that passed the handshake.
#[derive(Clone, Debug)]
pub struct Authenticated {
    pub mesh: MeshRecord,
    pub peer: PeerRecord,
    /// Ended sessions that gave up the name this peer took: they left the roster.
    pub claimed: Claimed,
    /// It joined the mesh with this hello (a join holding an older key may want a new one).
    pub joined: bool,
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> ErrorFrame {
    ErrorFrame::new(code, message)
}

fn internal(e: StoreError) -> ErrorFrame {
    crate::store::log_failure("store failure during handshake", &e);
    refuse(ErrorCode::Internal, "storage failure; retry later")
}

/// A name refusal from the store, or a storage failure.
/// A name being claimed (new, or changed) must follow today's rules; a peer keeping the name it has
/// is never refused for rules that came after it.
fn check_new_name(name: &str) -> Result<(), ErrorFrame> {
    names::validate_display(name).map_err(|e| refuse(ErrorCode::InvalidName, e.to_string()))
}

fn claim_failed(e: StoreError) -> ErrorFrame {
    match e {
        StoreError::NameTaken { .. } => refuse(ErrorCode::NameTaken, format!("{e}; choose another name")),
        e => internal(e),
    }
}

fn peer_from_claims(c: &HelloClaims, kind: PeerKind, member: PublicKey, role: Role, now: u64) -> PeerRecord {
    PeerRecord {
        key: c.key,
        kind,
        member,
        name: c.name.clone(),
        enc_key: c.enc_key,
        enc_sig: c.enc_sig,
        role,
        joined_at: now,
        last_seen: Some(now),
        revoked: false,
        ended_at: None,
        invited_by: None,
        revoked_at: None,
    }
}

pub async fn authenticate(
    store: &dyn Store,
    config: &BrokerConfig,
    challenge: &[u8],
    hello: &Hello,
) -> Result<Authenticated, ErrorFrame> {
    if hello.v != mesh_proto::PROTOCOL_VERSION {
        return Err(refuse(
            ErrorCode::UnsupportedVersion,
            format!("protocol v{} is not supported; this broker speaks v1", hello.v),
        ));
    }
    let claims: HelloClaims = hello.auth.open().map_err(|e| match e {
        ProtoError::BadSignature | ProtoError::BadKey => {
            refuse(ErrorCode::BadSignature, "hello signature does not verify")
        }
        other => refuse(ErrorCode::BadFrame, format!("hello claims: {other}")),
    })?;
    if claims.v != mesh_proto::PROTOCOL_VERSION {
        return Err(refuse(ErrorCode::UnsupportedVersion, "hello claims version is not 1"));
    }
    if claims.challenge != codec::b64(challenge) {
        return Err(refuse(ErrorCode::ChallengeMismatch, "hello does not answer this connection's challenge"));
    }
    claims
        .public_identity()
        .verify()
        .map_err(|_| refuse(ErrorCode::BadSignature, "encryption key is not signed by the identity key"))?;
    let now = now_ms();

    match &claims.intent {
        Intent::Create { mesh_name, create_token } => {
            create(store, config, &claims, mesh_name, create_token.as_deref(), now).await
        }
        Intent::Join { invite, proof } => {
            let invite: InviteClaims =
                invite.open().map_err(|e| refuse(ErrorCode::InviteInvalid, format!("invite: {e}")))?;
            invite::verify_proof(&invite, challenge, &claims.key, proof)
                .map_err(|_| refuse(ErrorCode::InviteInvalid, "no proof of holding the invite token"))?;
            join(store, &claims, &invite, now).await
        }
        Intent::Connect => match &claims.attestation {
            None => connect_member(store, &claims, now).await,
            Some(att) => connect_session(store, config, &claims, att, now).await,
        },
    }
}

async fn load_mesh(store: &dyn Store, id: MeshId) -> Result<MeshRecord, ErrorFrame> {
    store
        .mesh(id)
        .await
        .map_err(internal)?
        .ok_or_else(|| refuse(ErrorCode::UnknownMesh, format!("no mesh {id} on this broker")))
}

/// The refusal of a key removed from the mesh (or that left it) at `at`.
fn removed_refusal(at: u64) -> ErrorFrame {
    refuse(
        ErrorCode::Revoked,
        format!(
            "removed from this mesh at {}; only an invite issued after that lets it back in",
            humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(at))
        ),
    )
}

/// A live (not revoked) member of the mesh.
async fn load_member(store: &dyn Store, mesh: MeshId, key: PublicKey) -> Result<PeerRecord, ErrorFrame> {
    let peer = store
        .peer(mesh, key)
        .await
        .map_err(internal)?
        .filter(|p| p.kind == PeerKind::Member)
        .ok_or_else(|| refuse(ErrorCode::UnknownMember, format!("{} is not a member of this mesh", key.short())))?;
    if peer.revoked {
        return Err(peer
            .revoked_at
            .map_or_else(|| refuse(ErrorCode::Revoked, "membership was revoked"), removed_refusal));
    }
    Ok(peer)
}

async fn create(
    store: &dyn Store,
    config: &BrokerConfig,
    claims: &HelloClaims,
    mesh_name: &str,
    create_token: Option<&str>,
    now: u64,
) -> Result<Authenticated, ErrorFrame> {
    if let Some(required) = &config.create_token
        && create_token != Some(required.as_str())
    {
        return Err(refuse(ErrorCode::CreateForbidden, "this broker requires a create token to create meshes"));
    }
    names::validate_display(mesh_name).map_err(|e| refuse(ErrorCode::InvalidName, e.to_string()))?;
    check_new_name(&claims.name)?;
    let mesh = MeshRecord {
        id: claims.mesh_id,
        name: mesh_name.to_owned(),
        owner: claims.key,
        created_at: now,
        limits: Default::default(),
        key_epoch: 0,
        rekey_wanted: false,
    };
    let owner = peer_from_claims(claims, PeerKind::Member, claims.key, Role::Owner, now);
    match store.create_mesh(mesh.clone(), owner.clone()).await {
        Ok(()) => Ok(Authenticated { mesh, peer: owner, claimed: Claimed::default(), joined: false }),
        // A retried create by the same owner is a reconnect.
        Err(StoreError::MeshExists) => {
            let existing = load_mesh(store, claims.mesh_id).await?;
            if existing.owner != claims.key {
                return Err(refuse(ErrorCode::MeshExists, "a mesh with this id already exists"));
            }
            connect_member(store, claims, now).await
        }
        Err(e) => Err(internal(e)),
    }
}

async fn join(
    store: &dyn Store,
    claims: &HelloClaims,
    invite: &InviteClaims,
    now: u64,
) -> Result<Authenticated, ErrorFrame> {
    if invite.mesh_id != claims.mesh_id {
        return Err(refuse(ErrorCode::InviteInvalid, "the invite is for another mesh"));
    }
    let mesh = load_mesh(store, invite.mesh_id).await?;
    let issuer = load_member(store, mesh.id, invite.issued_by)
        .await
        .map_err(|_| refuse(ErrorCode::InviteInvalid, "the invite's issuer is not a member of this mesh"))?;
    if !issuer.role.is_admin() {
        return Err(refuse(ErrorCode::InviteInvalid, "the invite's issuer may not invite"));
    }
    if invite.role == Role::Owner {
        return Err(refuse(ErrorCode::InviteInvalid, "an invite cannot make an owner"));
    }
    if let Some(existing) = store.peer(mesh.id, claims.key).await.map_err(internal)? {
        // A removed member comes back only with an invite issued after its removal.
        match existing.revoked_at.filter(|_| existing.revoked) {
            Some(at) if invite.issued_at <= at => return Err(removed_refusal(at)),
            Some(_) => {}
            None if existing.revoked => return Err(refuse(ErrorCode::Revoked, "membership was revoked")),
            None => return connect_member(store, claims, now).await,
        }
    }
    if invite.expires_at <= now {
        return Err(refuse(ErrorCode::InviteExpired, "the invite has expired; ask for a new one"));
    }
    check_new_name(&claims.name)?;
    let peer = PeerRecord {
        invited_by: Some(invite.issued_by),
        ..peer_from_claims(claims, PeerKind::Member, claims.key, invite.role, now)
    };
    match store.join(mesh.id, InviteRecord::of(invite), peer).await {
        Ok(JoinOutcome::Joined(peer, claimed)) => Ok(Authenticated { mesh, peer, claimed, joined: true }),
        Ok(JoinOutcome::AlreadyMember(_)) => connect_member(store, claims, now).await,
        Err(StoreError::InviteExhausted) => Err(refuse(ErrorCode::InviteExhausted, "the invite has been used up")),
        Err(StoreError::InviteRevoked) => Err(refuse(ErrorCode::InviteInvalid, "the invite was revoked")),
        Err(e) => Err(claim_failed(e)),
    }
}

async fn connect_member(store: &dyn Store, claims: &HelloClaims, now: u64) -> Result<Authenticated, ErrorFrame> {
    let mesh = load_mesh(store, claims.mesh_id).await?;
    let existing = load_member(store, mesh.id, claims.key).await?;
    if existing.name != claims.name {
        check_new_name(&claims.name)?;
    }
    let peer = PeerRecord {
        last_seen: Some(now),
        invited_by: existing.invited_by,
        ..peer_from_claims(claims, PeerKind::Member, claims.key, existing.role, existing.joined_at)
    };
    let claimed = store.upsert_peer(mesh.id, peer.clone()).await.map_err(claim_failed)?;
    Ok(Authenticated { mesh, peer, claimed, joined: false })
}

async fn connect_session(
    store: &dyn Store,
    config: &BrokerConfig,
    claims: &HelloClaims,
    attestation: &mesh_proto::signed::Signed,
    now: u64,
) -> Result<Authenticated, ErrorFrame> {
    let att: SessionAttestation =
        attestation.open().map_err(|e| refuse(ErrorCode::AttestationInvalid, format!("attestation: {e}")))?;
    if att.session != claims.key || att.mesh_id != claims.mesh_id || att.name != claims.name {
        return Err(refuse(ErrorCode::AttestationInvalid, "attestation is for another session, mesh or name"));
    }
    // Clocks differ a little; an attestation from the future, or valid past 24 h from now, is not accepted.
    let skew = 5 * 60 * 1000;
    if att.expires_at <= now
        || att.expires_at.saturating_sub(att.issued_at) > MAX_ATTESTATION_MS
        || att.issued_at > now + skew
        || att.expires_at > now + MAX_ATTESTATION_MS + skew
    {
        return Err(refuse(ErrorCode::AttestationExpired, "attestation expired or longer than 24 h; re-mint it"));
    }
    let mesh = load_mesh(store, claims.mesh_id).await?;
    let member = load_member(store, mesh.id, att.member).await?;
    let existing = store.peer(mesh.id, claims.key).await.map_err(internal)?;
    if existing.as_ref().is_some_and(|e| e.kind != PeerKind::Session || e.member != member.key) {
        return Err(refuse(ErrorCode::AttestationInvalid, "this key is registered to someone else"));
    }
    if existing.as_ref().is_none_or(|e| e.name != claims.name) {
        check_new_name(&claims.name)?;
    }
    // A session that is new, or back from having ended, takes a place among the member's sessions.
    let most = config.mesh_limits(&mesh.limits).sessions_per_member as usize;
    if existing.as_ref().is_none_or(|e| e.ended_at.is_some())
        && store.live_sessions(mesh.id, member.key).await.map_err(internal)? >= most
    {
        return Err(refuse(
            ErrorCode::TooManySessions,
            format!(
                "this member already has {most} live sessions in this mesh, the most one member may have; \
                 end some (their processes exit), or wait for ended ones to be released"
            ),
        ));
    }
    let joined_at = existing.map_or(now, |p| p.joined_at);
    let peer = peer_from_claims(claims, PeerKind::Session, member.key, Role::Member, joined_at);
    let claimed = store.upsert_peer(mesh.id, peer.clone()).await.map_err(claim_failed)?;
    Ok(Authenticated { mesh, peer, claimed, joined: false })
}
