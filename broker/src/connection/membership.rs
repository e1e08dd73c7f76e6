//! The membership frames of a connection: invites registered, listed and revoked, and signed
//! membership changes (a member removed, a member leaving, a role changed). Only a member's own
//! connection may send them; what each may do is checked by the store in the change's transaction,
//! against the roles as they are then.

use mesh_proto::invite::InviteClaims;
use mesh_proto::membership::{self, ChangeKind, KeyGrant, MembershipAction};
use mesh_proto::wire::{
    DeliveryItem, ErrorCode, ErrorFrame, InvitesReply, KeyState, MembershipRequest, MeshKeyItem, PeerKind,
    RegisterInviteRequest, RevokeInviteRequest, Role, RotateKeyRequest, ServerFrame,
};
use mesh_proto::{ProtoError, PublicKey, now_ms};

use super::Connection;
use crate::presence::announce;
use crate::store::{InviteRecord, MembershipChange, StoreError};

impl Connection {
    /// Refuses request `id` with `code`.
    async fn refuse(&self, id: u64, code: ErrorCode, why: impl Into<String>) -> bool {
        self.send_error(ErrorFrame::new(code, why).with_id(Some(id))).await
    }

    /// Whether this is a member's own connection; refuses `id` when it is not.
    async fn member_connection(&self, id: u64, what: &str) -> Option<()> {
        if self.auth.peer.kind == PeerKind::Member {
            return Some(());
        }
        self.refuse(id, ErrorCode::Forbidden, format!("only a member's own connection may {what}")).await;
        None
    }

    /// Answers a store refusal with its code, or `internal`.
    async fn answer_refusal(&self, id: u64, e: StoreError) -> bool {
        let code = match &e {
            StoreError::Forbidden(_) => ErrorCode::Forbidden,
            StoreError::UnknownInvite(_) => ErrorCode::InviteInvalid,
            StoreError::UnknownMember(_) => ErrorCode::UnknownMember,
            _ => return self.answer(id, Err(e)).await,
        };
        self.refuse(id, code, e.to_string()).await
    }

    pub(super) async fn register_invite(&self, req: RegisterInviteRequest) -> bool {
        if self.member_connection(req.id, "register invites").await.is_none() {
            return true;
        }
        let claims: InviteClaims = match req.invite.open() {
            Ok(c) => c,
            Err(e) => return self.refuse(req.id, ErrorCode::InviteInvalid, format!("invite: {e}")).await,
        };
        if claims.mesh_id != self.mesh() {
            return self.refuse(req.id, ErrorCode::InviteInvalid, "the invite is for another mesh").await;
        }
        if claims.issued_by != self.key() {
            return self
                .refuse(req.id, ErrorCode::Forbidden, "an invite is registered by the member who issued it")
                .await;
        }
        if claims.role == Role::Owner {
            return self.refuse(req.id, ErrorCode::InviteInvalid, "an invite cannot make an owner").await;
        }
        match self.shared.store.register_invite(self.mesh(), InviteRecord::of(&claims)).await {
            Ok(()) => self.answer(req.id, Ok(())).await,
            Err(e) => self.answer_refusal(req.id, e).await,
        }
    }

    pub(super) async fn list_invites(&self, id: u64) -> bool {
        if self.member_connection(id, "list invites").await.is_none() {
            return true;
        }
        // The roles as stored now: a member made admin since it connected may list.
        match self.shared.store.peer(self.mesh(), self.key()).await {
            Ok(Some(me)) if me.role.is_admin() && !me.revoked => {}
            Ok(_) => {
                return self.refuse(id, ErrorCode::Forbidden, "only the mesh's owner and admins list invites").await;
            }
            Err(e) => return self.answer(id, Err(e)).await,
        }
        match self.shared.store.invites(self.mesh()).await {
            Ok(invites) => self.send_frame(ServerFrame::Invites(InvitesReply { id, invites })).await,
            Err(e) => self.answer(id, Err(e)).await,
        }
    }

    pub(super) async fn revoke_invite(&self, req: RevokeInviteRequest) -> bool {
        if self.member_connection(req.id, "revoke invites").await.is_none() {
            return true;
        }
        match self.shared.store.revoke_invite(self.mesh(), req.invite_id.clone(), self.key(), now_ms()).await {
            Ok(()) => {
                tracing::info!(mesh = %self.mesh(), by = %self.key(), invite = %req.invite_id, "invite revoked");
                self.answer(req.id, Ok(())).await
            }
            Err(e) => self.answer_refusal(req.id, e).await,
        }
    }

    /// A signed membership change: checked, recorded, and then the connections of whoever left the
    /// mesh are ended, the mesh is told (presence), and the members' notices are woken.
    pub(super) async fn change_membership(&self, req: MembershipRequest) -> bool {
        let id = req.id;
        if self.member_connection(id, "change the mesh's membership").await.is_none() {
            return true;
        }
        let action: MembershipAction = match req.action.open() {
            Ok(a) => a,
            Err(ProtoError::BadSignature | ProtoError::BadKey) => {
                return self
                    .refuse(id, ErrorCode::BadSignature, "the membership action's signature does not verify")
                    .await;
            }
            Err(e) => return self.refuse(id, ErrorCode::BadFrame, format!("membership action: {e}")).await,
        };
        let now = now_ms();
        let refusal = if action.v != 1 {
            Some((ErrorCode::UnsupportedVersion, "membership action version is not 1".to_owned()))
        } else if action.by != self.key() {
            Some((ErrorCode::Forbidden, "a membership action is sent by the member who signed it".to_owned()))
        } else if action.mesh_id != self.mesh() {
            Some((ErrorCode::Forbidden, "the membership action is for another mesh".to_owned()))
        } else if action.at.abs_diff(now) > membership::MAX_SKEW_MS {
            Some((
                ErrorCode::Forbidden,
                "the membership action's time is more than 10 minutes from the broker's clock; check this machine's clock"
                    .to_owned(),
            ))
        } else if action.kind == ChangeKind::SetRole && action.role.is_none() {
            Some((ErrorCode::BadFrame, "a role change names the role".to_owned()))
        } else {
            None
        };
        if let Some((code, why)) = refusal {
            return self.refuse(id, code, why).await;
        }
        if action.kind == ChangeKind::DeleteMesh {
            return self.delete_mesh(id, &action).await;
        }
        let change = MembershipChange {
            kind: action.kind,
            target: action.target,
            role: action.role,
            by: action.by,
            action: req.action,
            at: now,
        };
        let mesh = self.mesh();
        let done = match self.shared.store.change_membership(mesh, change).await {
            Ok(done) => done,
            Err(e) => return self.answer_refusal(id, e).await,
        };
        if let Some(notice) = &done.notice {
            tracing::info!(%mesh, kind = notice.kind.as_str(), target = %notice.target, by = %notice.by,
                role = ?notice.role, "membership changed");
        }
        // Answered first: a member that left hears `ok` before its connection ends.
        let answered = self.answer(id, Ok(())).await;
        let why = match done.notice.as_ref().map(|n| n.kind) {
            Some(ChangeKind::Leave) => "left the mesh".to_owned(),
            _ => format!("removed from the mesh by {}", self.me().name),
        };
        for gone in &done.removed {
            self.shared.revoke(mesh, &gone.key, &why);
        }
        for gone in &done.removed {
            announce(&self.shared, mesh, gone, false, true);
        }
        let connected = self.connected().await;
        for changed in &done.changed {
            announce(&self.shared, mesh, changed, connected.contains_key(&changed.key), false);
        }
        for key in &done.woken {
            self.shared.wake(mesh, key);
        }
        if !done.removed.is_empty() {
            // Someone left: its key is still the mesh's. Every connection hears that a new one is
            // wanted (the owner's and admins' daemons make it); the one who removed makes it now.
            self.tell_key_state(self.key(), false).await;
        }
        answered && !done.removed.iter().any(|p| p.key == self.key())
    }

    /// The owner deletes the mesh: everything of it goes, and every connection of it is ended.
    async fn delete_mesh(&self, id: u64, action: &MembershipAction) -> bool {
        if action.target != self.key() {
            return self.refuse(id, ErrorCode::Forbidden, "only the mesh's owner deletes it, for itself").await;
        }
        let mesh = self.mesh();
        match self.shared.store.delete_mesh(mesh, self.key()).await {
            Ok(keys) => {
                tracing::info!(%mesh, by = %self.key(), members = keys.len(), "mesh deleted by its owner");
                let answered = self.answer(id, Ok(())).await;
                self.shared.end_mesh(mesh, &format!("the mesh was deleted by its owner {}", self.me().name));
                let _ = answered;
                false
            }
            Err(e) => self.answer_refusal(id, e).await,
        }
    }

    /// A member says it holds only keys up to `have`: when the mesh's is newer, a new key is wanted,
    /// and the owner's and admins' daemons are told.
    pub(super) async fn key_wanted(&self, id: u64, have: u64) -> bool {
        if self.member_connection(id, "ask for the mesh key").await.is_none() {
            return true;
        }
        match self.shared.store.want_rekey(self.mesh(), have, now_ms()).await {
            Ok(wanted) => {
                let answered = self.answer(id, Ok(())).await;
                if wanted {
                    tracing::info!(mesh = %self.mesh(), member = %self.key(), have, "a member lacks the mesh's key");
                    self.tell_key_state(self.key(), false).await;
                }
                answered
            }
            Err(e) => self.answer(id, Err(e)).await,
        }
    }

    /// Tells every connection of the mesh but `except`'s the mesh's key epoch as stored now (with
    /// `only_if_wanted`, only when a new key is wanted).
    pub(super) async fn tell_key_state(&self, except: PublicKey, only_if_wanted: bool) {
        match self.shared.store.mesh(self.mesh()).await {
            Ok(Some(m)) if only_if_wanted && !m.rekey_wanted => {}
            Ok(Some(m)) => {
                let frame = ServerFrame::KeyState(KeyState { epoch: m.key_epoch, rekey_wanted: m.rekey_wanted });
                crate::presence::relay(&self.shared, self.mesh(), except, frame.to_json());
            }
            Ok(None) => {}
            Err(e) => crate::store::log_failure("reading the mesh's key epoch", &e),
        }
    }

    /// A new mesh key: every grant checked (signed by this connection's member, for this mesh and
    /// epoch, one per member), then recorded and queued for the members.
    pub(super) async fn rotate_key(&self, req: RotateKeyRequest) -> bool {
        let id = req.id;
        if self.member_connection(id, "make a new mesh key").await.is_none() {
            return true;
        }
        let now = now_ms();
        let mut grants = Vec::with_capacity(req.grants.len());
        for signed in req.grants {
            let grant: KeyGrant = match signed.open() {
                Ok(g) => g,
                Err(ProtoError::BadSignature | ProtoError::BadKey) => {
                    return self.refuse(id, ErrorCode::BadSignature, "a key grant's signature does not verify").await;
                }
                Err(e) => return self.refuse(id, ErrorCode::BadFrame, format!("key grant: {e}")).await,
            };
            let maker =
                mesh_proto::PublicIdentity { key: grant.by, enc_key: grant.by_enc_key, enc_sig: grant.by_enc_sig };
            if grant.by != self.key() || maker.verify().is_err() {
                return self
                    .refuse(id, ErrorCode::Forbidden, "key grants are sent by the member who signed them")
                    .await;
            }
            if grant.mesh_id != self.mesh() || grant.epoch != req.epoch || grant.v != 1 {
                return self.refuse(id, ErrorCode::BadFrame, "a key grant for another mesh or another epoch").await;
            }
            let item = DeliveryItem::MeshKey(MeshKeyItem { grant: signed, at: now });
            grants.push((grant.member, serde_json::to_string(&item).expect("items serialise")));
        }
        let mesh = self.mesh();
        match self.shared.store.rotate_key(mesh, self.key(), req.epoch, grants, now).await {
            Ok(members) => {
                tracing::info!(%mesh, epoch = req.epoch, by = %self.key(), "new mesh key");
                let answered = self.answer(id, Ok(())).await;
                for key in &members {
                    self.shared.wake(mesh, key);
                }
                self.tell_key_state(self.key(), false).await;
                answered
            }
            Err(e @ StoreError::RotationConflict(_)) => {
                self.refuse(id, ErrorCode::RotationConflict, e.to_string()).await
            }
            Err(e) => self.answer_refusal(id, e).await,
        }
    }
}
