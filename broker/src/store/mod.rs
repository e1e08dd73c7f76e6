//! The broker's durable state behind one trait, so that SQLite (one machine) and PostgreSQL (several
//! replicas) can serve the same protocol code. Every method is one transaction: a `send` is committed
//! to each recipient's queue before it is accepted; a queue row is deleted only by its recipient's ack
//! or by its TTL, and either way a receipt is queued for the sender in the same transaction.

pub mod postgres;
mod receipts;
pub mod sqlite;

use async_trait::async_trait;
use mesh_proto::wire::{PeerKind, Role};
use mesh_proto::{EncPublicKey, MeshId, PublicKey, Sig, Target};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshRecord {
    pub id: MeshId,
    pub name: String,
    pub owner: PublicKey,
    pub created_at: u64,
    /// The limits its owner and admins set.
    pub limits: MeshLimitSettings,
    /// The epoch of its current key.
    pub key_epoch: u64,
    /// A member left (or joined with an older key) since that key was made: a new one is wanted.
    pub rekey_wanted: bool,
}

/// A mesh's own limits, set by its owner or admins; `None` leaves the broker's value.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MeshLimitSettings {
    pub sessions_per_member: Option<u32>,
    pub connections_per_member: Option<u32>,
    pub connections: Option<u32>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerRecord {
    pub key: PublicKey,
    pub kind: PeerKind,
    pub member: PublicKey,
    pub name: String,
    pub enc_key: EncPublicKey,
    pub enc_sig: Sig,
    pub role: Role,
    pub joined_at: u64,
    pub last_seen: Option<u64>,
    pub revoked: bool,
    /// For a session: when it ended (its member's daemon said so, or it went unseen too long).
    pub ended_at: Option<u64>,
    /// For a member who joined with an invite: its issuer.
    pub invited_by: Option<PublicKey>,
    /// When it was removed from the mesh (or left it), if it was.
    pub revoked_at: Option<u64>,
}

impl PeerRecord {
    /// Who the peer is, in words (for a `name_taken` refusal).
    pub(crate) fn describe(&self) -> String {
        match self.kind {
            PeerKind::Member => format!("member {} ({})", self.name, self.key.short()),
            PeerKind::Session => format!("session {} ({})", self.name, self.key.short()),
        }
    }
}

/// A roster line: a peer and the groups it belongs to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RosterEntry {
    pub peer: PeerRecord,
    pub groups: Vec<String>,
}

/// A peer that took a name or came back: ended sessions that gave the name up left the roster.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Claimed {
    pub reaped: Vec<PeerRecord>,
}

/// What ending a session did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Ended {
    /// The session, now ended; `None` when it had ended already.
    pub ended: Option<PeerRecord>,
    /// The member's older ended sessions, past the number kept, removed from the roster.
    pub removed: Vec<PeerRecord>,
}

/// What a pass over the sessions did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Reaped {
    /// Sessions unseen past the stale period, now ended.
    pub ended: Vec<(MeshId, PeerRecord)>,
    /// Ended sessions past the grace period, now out of the roster.
    pub removed: Vec<(MeshId, PeerRecord)>,
}

/// A message accepted from a sender, ready to be queued for each recipient of `target`.
#[derive(Clone, Debug)]
pub struct NewMessage {
    pub mesh_id: MeshId,
    pub sender: PublicKey,
    pub client_message_id: String,
    pub fingerprint: [u8; 32],
    pub target: Target,
    /// Used unless the message turns out to be a duplicate.
    pub message_id: String,
    /// For a broadcast or group message: the epoch of the mesh key it is sealed under.
    pub key_epoch: Option<u64>,
    /// The `DeliveryItem::Message` JSON delivered to every recipient.
    pub item_json: String,
    pub created_at: u64,
    pub expires_at: u64,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Enqueued {
    pub message_id: String,
    pub duplicate: bool,
    /// The recipient queues that received a new row (empty for a duplicate).
    pub woken: Vec<PublicKey>,
    pub recipients: u32,
}

/// An item leased to a connection.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Leased {
    pub delivery_id: u64,
    pub item_json: String,
    /// It was leased before, and that lease ran out unacked: this is a redelivery.
    pub redelivery: bool,
}

/// One mesh's queue, for metrics.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QueueStat {
    pub mesh: MeshId,
    /// Items queued (messages and receipts).
    pub depth: u64,
    /// Age of the oldest queued message, in ms (0 when only receipts are queued).
    pub oldest_ms: u64,
}

/// What an ack or a read queued for senders.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Receipted {
    /// Senders to wake.
    pub woken: Vec<PublicKey>,
    /// Receipts queued.
    pub receipts: u64,
}

/// What one `lease` call took.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Lease {
    pub items: Vec<Leased>,
    /// When fewer items than asked were free: the earliest time a lease of this recipient runs out
    /// (this connection's, or one held by another or a previous connection of this key), so that the
    /// item can be delivered here then. Counting this connection's own leases is harmless: they are
    /// due then anyway, and the next lease looks again.
    pub next_foreign_expiry: Option<u64>,
}

/// What the broker remembers of an accepted send, for idempotency.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentRecord {
    pub fingerprint: [u8; 32],
    pub message_id: String,
    pub recipients: u32,
}

/// An invite as the broker records it (registered by its issuer, or seen at its first use).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InviteRecord {
    pub invite_id: String,
    pub issued_by: PublicKey,
    pub role: Role,
    pub issued_at: u64,
    pub expires_at: u64,
    pub max_uses: Option<u32>,
    /// The epoch of the mesh key it carries.
    pub key_epoch: u64,
}

impl InviteRecord {
    pub fn of(claims: &mesh_proto::invite::InviteClaims) -> InviteRecord {
        InviteRecord {
            invite_id: claims.invite_id.clone(),
            issued_by: claims.issued_by,
            role: claims.role,
            issued_at: claims.issued_at,
            expires_at: claims.expires_at,
            max_uses: claims.max_uses,
            key_epoch: claims.key_epoch,
        }
    }
}

/// A membership change, as verified by the broker: who asked, what, and the signed action (JSON of
/// the `Signed`, kept with the notice every member gets).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MembershipChange {
    pub kind: mesh_proto::membership::ChangeKind,
    pub target: PublicKey,
    pub role: Option<Role>,
    pub by: PublicKey,
    pub action: mesh_proto::signed::Signed,
    pub at: u64,
}

/// What a membership change did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MembershipOutcome {
    /// Peers now out of the mesh (a member and its sessions): their connections are closed.
    pub removed: Vec<PeerRecord>,
    /// Members whose role changed, as they are now.
    pub changed: Vec<PeerRecord>,
    /// Keys whose queues got items (notices, receipts): to wake.
    pub woken: Vec<PublicKey>,
    /// The notice queued for the members (`None` when nothing changed).
    pub notice: Option<mesh_proto::wire::MembershipNotice>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum JoinOutcome {
    Joined(PeerRecord, Claimed),
    /// The key was already a member: nothing consumed, treat as a reconnect.
    AlreadyMember(PeerRecord),
}

/// What the janitor did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Expired {
    pub messages_expired: u64,
    pub receipts_dropped: u64,
    /// `expired` receipts queued for the senders of the expired messages.
    pub receipts: u64,
    /// Senders that got an `expired` receipt, to be woken.
    pub woken: Vec<(MeshId, PublicKey)>,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("a mesh with this id already exists")]
    MeshExists,
    #[error("the invite has been used up")]
    InviteExhausted,
    #[error("the invite was revoked")]
    InviteRevoked,
    #[error("no invite {0} in this mesh")]
    UnknownInvite(String),
    #[error("{0}")]
    UnknownMember(String),
    /// A broadcast or group message sealed under a key older than the mesh's (epoch `current`).
    #[error("sealed under a replaced mesh key; the mesh's key is epoch {current} now")]
    StaleKey { current: u64 },
    #[error("{0}")]
    RotationConflict(String),
    #[error("no such recipient in this mesh: {0}")]
    RecipientUnknown(String),
    #[error("client_message_id {0:?} was already used for a different message")]
    IdempotencyConflict(String),
    /// Another peer of the mesh holds this name, or one that looks the same.
    #[error("the name {name:?} is taken in this mesh by {holder}")]
    NameTaken { name: String, holder: String },
    #[error("{0}")]
    Forbidden(String),
    #[error("storage failure: {0}")]
    Backend(String),
}

impl From<crate::sqlite::DbError> for StoreError {
    fn from(e: crate::sqlite::DbError) -> Self {
        StoreError::Backend(mesh_proto::error::chain(&e))
    }
}

/// What one replica hears from the others sharing its database.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClusterEvent {
    /// New items for a recipient (that may be connected here).
    Wake { mesh: MeshId, key: PublicKey },
    /// A newer connection of `key` on another replica supersedes this replica's connection `conn`.
    Kick { mesh: MeshId, key: PublicKey, conn: u64 },
    /// A `presence` frame for every connection of `mesh` here but `except`'s.
    Presence { mesh: MeshId, except: PublicKey, frame: String },
    /// `key` was removed from `mesh` on another replica: its connection here ends (`revoked`).
    Revoke { mesh: MeshId, key: PublicKey, why: String },
    /// `mesh` was deleted on another replica: its connections here end (`unknown_mesh`).
    Deleted { mesh: MeshId, why: String },
    /// A replica died without saying goodbye: its connection of `key` is gone (tell the mesh).
    Gone { mesh: MeshId, key: PublicKey },
    /// Wake-ups may have been missed (the listening connection was re-established, or the safety
    /// poll): every connection here looks at its queue again. With `presence`, presence frames may
    /// have been missed too (nobody here was listening): every connection here is told the current
    /// presence of its mesh's peers.
    CatchUp { presence: bool },
    /// This replica was taken for dead by the others: its connections must be claimed again.
    Reclaim,
    /// A heartbeat went through, or failed (for the metrics).
    Heartbeat { ok: bool },
}

/// What one replica tells the others.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Note {
    Wake {
        mesh: MeshId,
        key: PublicKey,
    },
    Presence {
        mesh: MeshId,
        except: PublicKey,
        frame: String,
    },
    /// `key` is out of `mesh`: end its connection wherever it is.
    Revoke {
        mesh: MeshId,
        key: PublicKey,
        why: String,
    },
    /// `mesh` was deleted: end all its connections wherever they are.
    Deleted {
        mesh: MeshId,
        why: String,
    },
}

/// Several broker replicas sharing one database (PostgreSQL): which connections are where, and the
/// wake-ups, presence and supersedes that cross between them.
#[async_trait]
pub trait Cluster: Send + Sync {
    /// Starts listening to the other replicas (events go to `events`) and keeping this one's
    /// heartbeat, until `stop`; then says goodbye (its connections and leases are freed). The task
    /// returned ends after the goodbye.
    fn start(
        &self,
        events: tokio::sync::mpsc::UnboundedSender<ClusterEvent>,
        stop: tokio_util::sync::CancellationToken,
    ) -> tokio::task::JoinHandle<()>;
    /// Tells the other replicas (coalesced, never waits).
    fn publish(&self, note: Note);
    /// Records that `key` is connected here as connection `conn`; a connection of the key on
    /// another replica is told it is superseded.
    async fn claim_connection(
        &self,
        mesh: MeshId,
        key: PublicKey,
        member: PublicKey,
        conn: u64,
    ) -> Result<(), StoreError>;
    /// After this replica was taken for dead: records `key`'s connection `conn` here again unless
    /// another replica holds the key now (its member moved there meanwhile; then this connection is
    /// the stale one). Whether it was recorded.
    async fn reclaim_connection(
        &self,
        mesh: MeshId,
        key: PublicKey,
        member: PublicKey,
        conn: u64,
    ) -> Result<bool, StoreError>;
    /// Forgets connection `conn` of `key` (if it is still the recorded one).
    async fn drop_connection(&self, mesh: MeshId, key: PublicKey, conn: u64) -> Result<(), StoreError>;
    /// The keys of `mesh` connected on any live replica, each with its member.
    async fn connected(&self, mesh: MeshId) -> Result<Vec<(PublicKey, PublicKey)>, StoreError>;
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// The replicas sharing this store's data, if several can (`None`: this process is the only one).
    fn cluster(&self) -> Option<&dyn Cluster> {
        None
    }

    async fn create_mesh(&self, mesh: MeshRecord, owner: PeerRecord) -> Result<(), StoreError>;
    async fn mesh(&self, id: MeshId) -> Result<Option<MeshRecord>, StoreError>;
    async fn peer(&self, mesh: MeshId, key: PublicKey) -> Result<Option<PeerRecord>, StoreError>;
    /// Adds `peer` as a member through `invite`, counting the use against its `max_uses`
    /// (`InviteRevoked` when it was revoked; recorded as an invite at its first use when its issuer
    /// never registered it). A key that was removed from the mesh comes back as a new member.
    async fn join(&self, mesh: MeshId, invite: InviteRecord, peer: PeerRecord) -> Result<JoinOutcome, StoreError>;
    /// Records an invite its issuer minted, so that it is listed and can be revoked (idempotent).
    /// `Forbidden` unless the issuer is a live owner or admin.
    async fn register_invite(&self, mesh: MeshId, invite: InviteRecord) -> Result<(), StoreError>;
    /// The mesh's invites (newest first, at most 1000), each with its uses.
    async fn invites(&self, mesh: MeshId) -> Result<Vec<mesh_proto::wire::InviteInfo>, StoreError>;
    /// Revokes an invite (`by` must be a live owner or admin; `UnknownInvite` for an id the mesh
    /// never saw). Revoking one already revoked keeps the first revocation.
    async fn revoke_invite(&self, mesh: MeshId, invite_id: String, by: PublicKey, now: u64) -> Result<(), StoreError>;
    /// Applies a membership change, checking in the same transaction that `by` may make it: a
    /// removal or a leave takes the member and its sessions out of the mesh (refused from then on),
    /// with their groups, and deletes their queued items, queueing a `revoked` receipt for each
    /// message's sender; every change queues a notice for each remaining member.
    async fn change_membership(&self, mesh: MeshId, change: MembershipChange) -> Result<MembershipOutcome, StoreError>;
    /// A member holds keys only up to epoch `have`: when that is older than the mesh's, a new key is
    /// wanted. Whether it is wanted now.
    async fn want_rekey(&self, mesh: MeshId, have: u64, now: u64) -> Result<bool, StoreError>;
    /// Deletes the mesh for its owner `by` (checked in the same transaction): every member, session,
    /// group, invite, queue and message of it. Returns the keys that were in it.
    async fn delete_mesh(&self, mesh: MeshId, by: PublicKey) -> Result<Vec<PublicKey>, StoreError>;
    /// Makes epoch `epoch` the mesh's key, made by `by` (a live owner or admin), queueing each
    /// grant for its member: refused (`RotationConflict`) unless `epoch` is newer than the current
    /// one and `grants` are for exactly the mesh's members now. A new key is no longer wanted after
    /// it. Returns the members to wake.
    async fn rotate_key(
        &self,
        mesh: MeshId,
        by: PublicKey,
        epoch: u64,
        grants: Vec<(PublicKey, String)>,
        now: u64,
    ) -> Result<Vec<PublicKey>, StoreError>;
    /// Inserts or refreshes a peer (a session on connect, or a member whose name or keys changed)
    /// and records it as seen now; a session that had ended is live again. A new peer, or a changed
    /// name, claims the name ([`Store::rename`]'s rule); a peer keeping its name is never refused.
    async fn upsert_peer(&self, mesh: MeshId, peer: PeerRecord) -> Result<Claimed, StoreError>;
    async fn touch_peer(&self, mesh: MeshId, key: PublicKey, seen_at: u64) -> Result<(), StoreError>;
    /// How many sessions of `member` in `mesh` have not ended.
    async fn live_sessions(&self, mesh: MeshId, member: PublicKey) -> Result<usize, StoreError>;
    /// Every peer not removed, with its groups.
    async fn roster(&self, mesh: MeshId) -> Result<Vec<RosterEntry>, StoreError>;
    /// Gives `key` the display name `name`. Refused with `NameTaken` when another peer of the mesh
    /// holds a name that looks alike ([`mesh_proto::names::NameKeys`]); an
    /// ended session holding it gives it up and leaves the roster (returned in `reaped`).
    async fn rename(&self, mesh: MeshId, key: PublicKey, name: String) -> Result<(PeerRecord, Claimed), StoreError>;
    /// Marks `session`, a session of `member`, ended now (keeping the member's newest `keep_ended`
    /// ended sessions in the roster, removing older ones): it receives no broadcasts or group
    /// messages from now on. `None` when it had already ended; `Forbidden` when it is not a session
    /// of `member`.
    async fn end_session(
        &self,
        mesh: MeshId,
        member: PublicKey,
        session: PublicKey,
        now: u64,
        keep_ended: usize,
    ) -> Result<Ended, StoreError>;
    /// Ends sessions unseen for `stale_ms` that are not `online`, and removes sessions that ended
    /// more than `grace_ms` ago (with their group memberships; their queues stay until their TTL).
    async fn reap_sessions(
        &self,
        now: u64,
        stale_ms: u64,
        grace_ms: u64,
        online: Vec<(MeshId, PublicKey)>,
    ) -> Result<Reaped, StoreError>;

    /// Queues each message for every recipient of its target, in order, committed together; each one
    /// succeeds or fails on its own. Idempotent on (mesh, sender, client_message_id): a duplicate with
    /// the same fingerprint returns the first message id and queues nothing; a different fingerprint is
    /// an `IdempotencyConflict`. `Err` only when none of them could be stored.
    async fn enqueue_many(&self, msgs: Vec<NewMessage>) -> Result<Vec<Result<Enqueued, StoreError>>, StoreError>;
    /// The accepted send of (mesh, sender, client_message_id), if any (within retention).
    async fn find_sent(
        &self,
        mesh: MeshId,
        sender: PublicKey,
        client_message_id: &str,
    ) -> Result<Option<SentRecord>, StoreError>;
    /// Leases up to `limit` of `recipient`'s items whose lease is free or expired, oldest first.
    async fn lease(
        &self,
        mesh: MeshId,
        recipient: PublicKey,
        conn: u64,
        limit: u32,
        now: u64,
        lease_ms: u64,
    ) -> Result<Lease, StoreError>;
    /// Deletes acked items of `recipient` and queues a `delivered` receipt to each message's sender
    /// (one `receipts` item per sender when there are several). Returns the senders to wake. Unknown
    /// ids are ignored (acks are idempotent).
    async fn ack(
        &self,
        mesh: MeshId,
        recipient: PublicKey,
        delivery_ids: Vec<u64>,
        now: u64,
    ) -> Result<Receipted, StoreError>;
    /// Frees the leases a closed connection held.
    async fn release(&self, mesh: MeshId, recipient: PublicKey, conn: u64) -> Result<(), StoreError>;
    /// Drops items past their TTL (queueing `expired` receipts for undelivered messages) and forgets
    /// idempotency records past retention.
    async fn expire(&self, now: u64) -> Result<Expired, StoreError>;
    /// Items queued per mesh, and the age at `now` of each mesh's oldest queued message (metrics).
    async fn queue_stats(&self, now: u64) -> Result<Vec<QueueStat>, StoreError>;
    /// Tells `observer` the size and duration of every commit of store writes (metrics).
    fn observe_commits(&self, observer: crate::sqlite::CommitObserver);
    /// Records that `reader` read these messages and queues a `read` receipt for each one's sender,
    /// once per (message, reader), and only for messages addressed to the reader. Returns the senders
    /// to wake; unknown or expired message ids are skipped.
    async fn record_reads(
        &self,
        mesh: MeshId,
        reader: PublicKey,
        message_ids: Vec<String>,
        now: u64,
    ) -> Result<Receipted, StoreError>;
    /// Changes the mesh's limits: with `reset`, every setting is cleared first; then each value
    /// `change` has replaces the setting. Returns the settings now.
    async fn set_mesh_limits(
        &self,
        mesh: MeshId,
        reset: bool,
        change: MeshLimitSettings,
    ) -> Result<MeshLimitSettings, StoreError>;
    /// Adds `key` to `@group` (or removes it); idempotent. Returns the groups `key` is in now.
    async fn set_group(
        &self,
        mesh: MeshId,
        key: PublicKey,
        group: String,
        member: bool,
    ) -> Result<Vec<String>, StoreError>;
}

/// Whether `by` may make `change` to `target` (both live members): the rules both stores apply in
/// the change's transaction. The owner is never removed and never leaves (it hands ownership over
/// first, or deletes the mesh); admins remove members, the owner removes anyone; only the owner
/// changes roles.
pub(crate) fn membership_rule(by: &PeerRecord, target: &PeerRecord, change: &MembershipChange) -> Result<(), String> {
    use mesh_proto::membership::ChangeKind;
    match change.kind {
        ChangeKind::Leave if target.key != by.key => Err("a member leaves only for itself".into()),
        ChangeKind::Leave if by.role == Role::Owner => {
            Err("the owner cannot leave: hand ownership over first (`mesh role NAME owner`), or delete the mesh".into())
        }
        ChangeKind::Leave => Ok(()),
        ChangeKind::Remove if target.key == by.key => Err("to remove yourself, leave the mesh".into()),
        ChangeKind::Remove if !by.role.is_admin() => Err("only the mesh's owner and admins remove members".into()),
        ChangeKind::Remove if target.role == Role::Owner => Err("the mesh's owner cannot be removed".into()),
        ChangeKind::Remove if target.role == Role::Admin && by.role != Role::Owner => {
            Err("only the mesh's owner removes an admin".into())
        }
        ChangeKind::Remove => Ok(()),
        ChangeKind::SetRole if by.role != Role::Owner => Err("only the mesh's owner changes roles".into()),
        ChangeKind::SetRole if target.key == by.key => {
            Err("the owner keeps its role until it hands ownership to another member".into())
        }
        ChangeKind::SetRole if change.role.is_none() => Err("a role change names the role".into()),
        ChangeKind::SetRole => Ok(()),
        ChangeKind::DeleteMesh if by.role != Role::Owner || target.key != by.key => {
            Err("only the mesh's owner deletes it".into())
        }
        ChangeKind::DeleteMesh => Ok(()),
    }
}

/// How long a key grant waits for a member who is away: a member away longer misses that key (an
/// owner or admin makes another with `mesh mesh rotate-key`).
pub const GRANT_TTL_MS: u64 = 30 * 24 * 60 * 60 * 1000;

/// Why `grants` (their members) are not for exactly `members`, if they are not.
pub(crate) fn grants_mismatch(members: &[PublicKey], grants: &[(PublicKey, String)]) -> Option<String> {
    let granted: std::collections::BTreeSet<PublicKey> = grants.iter().map(|(k, _)| *k).collect();
    let live: std::collections::BTreeSet<PublicKey> = members.iter().copied().collect();
    let missing: Vec<String> = live.difference(&granted).map(|k| k.short()).collect();
    let extra: Vec<String> = granted.difference(&live).map(|k| k.short()).collect();
    if granted.len() != grants.len() {
        return Some("a member is granted the key twice".into());
    }
    match (missing.is_empty(), extra.is_empty()) {
        (true, true) => None,
        _ => Some(format!(
            "the grants are not for the mesh's members now (missing: {}; not members: {})",
            if missing.is_empty() { "none".into() } else { missing.join(", ") },
            if extra.is_empty() { "none".into() } else { extra.join(", ") },
        )),
    }
}

/// The notice every remaining member is sent for `change`, which `by` made to `target`.
pub(crate) fn notice_of(
    change: &MembershipChange,
    target: &PeerRecord,
    by: &PeerRecord,
) -> mesh_proto::wire::MembershipNotice {
    use mesh_proto::membership::ChangeKind;
    mesh_proto::wire::MembershipNotice {
        kind: change.kind,
        target: target.key,
        target_name: target.name.clone(),
        by: by.key,
        by_name: by.name.clone(),
        role: change.role.filter(|_| change.kind == ChangeKind::SetRole),
        at: change.at,
        action: change.action.clone(),
    }
}

/// Logs a store failure, at most once a second across the broker: a database outage fails every
/// request at once, and one line a second says so (with how many were left out) without burying
/// the log.
pub(crate) fn log_failure(what: &str, e: &StoreError) {
    use std::sync::{Mutex, PoisonError};
    use std::time::{Duration, Instant};
    static LAST: Mutex<Option<(Instant, u64)>> = Mutex::new(None);
    let mut last = LAST.lock().unwrap_or_else(PoisonError::into_inner);
    let now = Instant::now();
    if let Some((at, left_out)) = last.as_mut()
        && now.duration_since(*at) < Duration::from_secs(1)
    {
        *left_out += 1;
        return;
    }
    let left_out = last.map_or(0, |(_, n)| n);
    *last = Some((now, 0));
    drop(last);
    if left_out > 0 {
        tracing::error!(error = %mesh_proto::error::chain(e), more_failures_left_out = left_out, "{what}");
    } else {
        tracing::error!(error = %mesh_proto::error::chain(e), "{what}");
    }
}
