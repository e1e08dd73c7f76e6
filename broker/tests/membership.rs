//! Who belongs to a mesh: members removed (connected or not) and refused from then on with their
//! queues gone and receipted, members leaving, roles that follow the rules and take effect at once,
//! invites listed and revoked. On both stores.

#[macro_use]
mod common;

use common::*;
use mesh_broker::BrokerConfig;
use mesh_proto::crypto::GroupKey;
use mesh_proto::membership::{ChangeKind, MembershipAction};
use mesh_proto::message::SealKey;
use mesh_proto::signed::Signed;
use mesh_proto::wire::{
    ClientFrame, DeliveryItem, ErrorCode, Intent, InvitesRequest, MembershipRequest, ReceiptKind,
    RegisterInviteRequest, RevokeInviteRequest, Role, RosterRequest, ServerFrame,
};
use mesh_proto::wire::{KeyState, RotateKeyRequest, SendMessage};
use mesh_proto::{Identity, MeshId, PublicKey, now_ms};

on_both_stores!(
    a_member_removed_while_connected_is_cut_off_refused_and_its_queue_receipted,
    a_member_removed_while_offline_is_refused_when_it_comes_back_and_a_newer_invite_readmits_it,
    roles_follow_the_rules_and_take_effect_at_once,
    a_member_leaves_and_the_owner_hands_ownership_over_first,
    invites_are_listed_with_their_uses_and_a_revoked_one_is_refused,
    membership_actions_must_be_signed_by_the_connection_s_member_now,
    new_mesh_keys_follow_the_rules_and_a_broadcast_under_a_replaced_key_is_refused,
    the_owner_deletes_the_mesh_and_every_connection_is_cut_off,
);

/// A new key of `epoch` made by `by` for `members`, as a `rotate_key` request.
fn rotation(id: u64, by: &Identity, mesh: MeshId, epoch: u64, members: &[&Identity], key: &GroupKey) -> ClientFrame {
    let grants =
        members.iter().map(|m| mesh_proto::membership::grant(by, mesh, epoch, &m.public(), key, now_ms())).collect();
    ClientFrame::RotateKey(RotateKeyRequest { id, epoch, grants })
}

/// The next `key_state` told to `c` (other frames before it are passed over).
async fn key_state(c: &mut Client) -> KeyState {
    loop {
        if let ServerFrame::KeyState(k) = c.recv().await {
            return k;
        }
    }
}

/// A broadcast from `from` sealed under `key`, declared as of `epoch`; the broker's answer.
async fn broadcast_under(
    c: &mut Client,
    from: &Identity,
    mesh: MeshId,
    id: u64,
    key: &GroupKey,
    epoch: Option<u64>,
) -> Result<(), ErrorCode> {
    let send = SendMessage {
        key_epoch: epoch,
        ..sealed_send(from, mesh, id, &format!("bc-{id}"), mesh_proto::Target::All, SealKey::Group(key), "to all")
    };
    c.send(&ClientFrame::Send(send)).await;
    loop {
        match c.recv().await {
            ServerFrame::Accepted(a) if a.id == id => return Ok(()),
            ServerFrame::Error(e) if e.id == Some(id) => return Err(e.code),
            _ => continue,
        }
    }
}

fn action(by: &Identity, mesh: MeshId, kind: ChangeKind, target: PublicKey, role: Option<Role>) -> Signed {
    Signed::sign(by, &MembershipAction { v: 1, mesh_id: mesh, kind, target, role, by: by.key(), at: now_ms() })
}

fn change(id: u64, action: Signed) -> ClientFrame {
    ClientFrame::Membership(MembershipRequest { id, action })
}

/// The answer to request `id`: `Ok(())`, or the error's code. Skips presence and deliveries.
async fn answer(c: &mut Client, id: u64) -> Result<(), ErrorCode> {
    loop {
        match c.recv().await {
            ServerFrame::Ok(ok) if ok.id == id => return Ok(()),
            ServerFrame::Error(e) if e.id == Some(id) => return Err(e.code),
            _ => continue,
        }
    }
}

/// Sends a membership change and returns the broker's answer.
async fn ask(c: &mut Client, id: u64, action: Signed) -> Result<(), ErrorCode> {
    c.send(&change(id, action)).await;
    answer(c, id).await
}

/// Joins `who` with `token` as `name`; returns the answer to its hello.
async fn join(
    broker: &TestBroker,
    token: &mesh_proto::invite::InviteToken,
    who: &Identity,
    mesh: MeshId,
    name: &str,
) -> (Client, ServerFrame) {
    let mut c = Client::connect(broker).await;
    let intent = join_intent(token, &c.challenge.clone(), who);
    let answer = c.hello(who, mesh, name, intent).await;
    (c, answer)
}

/// Connects `who` as a returning member; returns the answer to its hello.
async fn reconnect(broker: &TestBroker, who: &Identity, mesh: MeshId, name: &str) -> (Client, ServerFrame) {
    let mut c = Client::connect(broker).await;
    let answer = c.hello(who, mesh, name, Intent::Connect).await;
    (c, answer)
}

/// Every item delivered to `c` until one matches `stop`, acked; returns them.
async fn deliveries_until(c: &mut Client, stop: impl Fn(&DeliveryItem) -> bool) -> Vec<DeliveryItem> {
    let mut seen = Vec::new();
    loop {
        if let ServerFrame::Deliver(d) = c.recv().await {
            c.send(&ClientFrame::Ack(mesh_proto::wire::Ack { delivery_ids: vec![d.delivery_id] })).await;
            let done = stop(&d.item);
            seen.push(d.item);
            if done {
                return seen;
            }
        }
    }
}

fn revoked_receipts(items: &[DeliveryItem]) -> Vec<String> {
    let mut out = Vec::new();
    for item in items {
        let receipts = match item {
            DeliveryItem::Receipt(r) => vec![r.clone()],
            DeliveryItem::Receipts(b) => b.receipts.clone(),
            _ => vec![],
        };
        out.extend(receipts.into_iter().filter(|r| r.kind == ReceiptKind::Revoked).map(|r| r.client_message_id));
    }
    out.sort();
    out
}

async fn list_invites(c: &mut Client, id: u64) -> Vec<mesh_proto::wire::InviteInfo> {
    c.send(&ClientFrame::Invites(InvitesRequest { id })).await;
    loop {
        if let ServerFrame::Invites(i) = c.recv().await
            && i.id == id
        {
            return i.invites;
        }
    }
}

async fn roster_keys(c: &mut Client, id: u64) -> Vec<PublicKey> {
    c.send(&ClientFrame::Roster(RosterRequest { id, after: None })).await;
    loop {
        if let ServerFrame::Roster(r) = c.recv().await {
            return r.peers.into_iter().map(|p| p.key).collect();
        }
    }
}

/// A third member `carol`, joined and welcomed.
async fn third(broker: &TestBroker, owner: &Identity, mesh: MeshId, name: &str) -> (Identity, Client) {
    let carol = Identity::generate();
    let token = mint_invite(owner, mesh, &broker.url(), now_ms() + 60_000, None);
    let (c, answer) = join(broker, &token, &carol, mesh, name).await;
    assert!(matches!(answer, ServerFrame::Welcome(_)), "{answer:?}");
    (carol, c)
}

async fn a_member_removed_while_connected_is_cut_off_refused_and_its_queue_receipted(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let TwoMembers { mesh, a, b, mut ca, mut cb } = two_members(&broker).await;
    let (carol, mut cc) = third(&broker, &a, mesh, "carol").await;
    let session = Identity::generate();
    let (mut cs, answer) = session_hello_answer(&broker, &b, &session, mesh, "bob-worker").await;
    assert!(matches!(answer, ServerFrame::Welcome(_)), "{answer:?}");
    registered(&mut ca, &session).await;
    // Carol's messages for bob and his session: delivered on their connections, never acked.
    for (i, to) in [&b, &b, &session].into_iter().enumerate() {
        cc.send(&ClientFrame::Send(dm(&carol, mesh, to, 10 + i as u64, &format!("for-bob-{i}"), "hi"))).await;
    }
    for _ in 0..2 {
        assert!(matches!(cb.recv_non_presence().await, ServerFrame::Deliver(_)));
    }

    assert_eq!(ask(&mut ca, 1, action(&a, mesh, ChangeKind::Remove, b.key(), None)).await, Ok(()));
    // Cut off at once, with the reason, both the member and its session.
    for c in [&mut cb, &mut cs] {
        let code = loop {
            match c.try_recv().await {
                Some(ServerFrame::Error(e)) => break Some(e.code),
                Some(_) => continue,
                None => break None,
            }
        };
        assert_eq!(code, Some(ErrorCode::Revoked));
        // Then closed, with nothing more delivered.
        while let Some(frame) = c.try_recv().await {
            assert!(!matches!(frame, ServerFrame::Deliver(_)), "delivered after the refusal: {frame:?}");
        }
    }
    // Carol hears of it: bob and his session leave the roster, the notice is queued for her, and
    // her three messages come back as `revoked` receipts.
    let items = deliveries_until(&mut cc, |i| matches!(i, DeliveryItem::Membership(_))).await;
    let notice = items.iter().find_map(|i| match i {
        DeliveryItem::Membership(n) => Some(n.clone()),
        _ => None,
    });
    let notice = notice.expect("a notice");
    assert_eq!((notice.kind, notice.target, notice.by), (ChangeKind::Remove, b.key(), a.key()));
    assert_eq!(notice.target_name, "bob");
    let mut receipts = revoked_receipts(&items);
    while receipts.len() < 3 {
        let more =
            deliveries_until(&mut cc, |i| matches!(i, DeliveryItem::Receipt(_) | DeliveryItem::Receipts(_))).await;
        receipts.extend(revoked_receipts(&more));
        receipts.sort();
    }
    assert_eq!(receipts, ["for-bob-0", "for-bob-1", "for-bob-2"]);
    let roster = roster_keys(&mut cc, 2).await;
    assert!(!roster.contains(&b.key()) && !roster.contains(&session.key()), "gone from the roster");
    assert!(roster.contains(&a.key()) && roster.contains(&carol.key()));

    // Refused from then on: the member, its session, and a send to it.
    let (_, answer) = reconnect(&broker, &b, mesh, "bob").await;
    assert_eq!(code_of(&answer), Some(ErrorCode::Revoked), "{answer:?}");
    let (_, answer) = session_hello_answer(&broker, &b, &session, mesh, "bob-worker").await;
    assert_eq!(code_of(&answer), Some(ErrorCode::Revoked), "{answer:?}");
    cc.send(&ClientFrame::Send(dm(&carol, mesh, &b, 20, "too-late", "hi"))).await;
    let refused = loop {
        match cc.recv_non_presence().await {
            ServerFrame::Error(e) if e.id == Some(20) => break e.code,
            ServerFrame::Accepted(a) if a.id == 20 => panic!("accepted for a removed member"),
            _ => continue,
        }
    };
    assert_eq!(refused, ErrorCode::RecipientUnknown);
    // A broadcast reaches the two who remain.
    cc.send(&ClientFrame::Send(broadcast(&carol, mesh, 21, "all", "hi"))).await;
    let recipients = loop {
        if let ServerFrame::Accepted(a) = cc.recv_non_presence().await
            && a.id == 21
        {
            break a.recipients;
        }
    };
    assert_eq!(recipients, 1, "only alice, besides carol");
    // Removing again: not a member any more.
    assert_eq!(
        ask(&mut ca, 3, action(&a, mesh, ChangeKind::Remove, b.key(), None)).await,
        Err(ErrorCode::UnknownMember)
    );
    broker.stop().await;
}

async fn a_member_removed_while_offline_is_refused_when_it_comes_back_and_a_newer_invite_readmits_it(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let TwoMembers { mesh, a, b, mut ca, cb } = two_members(&broker).await;
    let old_token = mint_invite(&a, mesh, &broker.url(), now_ms() + 60_000, None);
    drop(cb);
    for i in 0..5 {
        ca.send(&ClientFrame::Send(dm(&a, mesh, &b, 10 + i, &format!("queued-{i}"), "while away"))).await;
    }
    assert_eq!(ask(&mut ca, 1, action(&a, mesh, ChangeKind::Remove, b.key(), None)).await, Ok(()));
    let items = deliveries_until(&mut ca, |i| matches!(i, DeliveryItem::Membership(_))).await;
    let mut receipts = revoked_receipts(&items);
    while receipts.len() < 5 {
        let more =
            deliveries_until(&mut ca, |i| matches!(i, DeliveryItem::Receipt(_) | DeliveryItem::Receipts(_))).await;
        receipts.extend(revoked_receipts(&more));
        receipts.sort();
    }
    assert_eq!(receipts, (0..5).map(|i| format!("queued-{i}")).collect::<Vec<_>>());

    let (_, answer) = reconnect(&broker, &b, mesh, "bob").await;
    let ServerFrame::Error(e) = &answer else { panic!("refused: {answer:?}") };
    assert_eq!(e.code, ErrorCode::Revoked);
    assert!(e.message.contains("removed from this mesh"), "{}", e.message);
    // An invite issued before the removal does not let it back in; one issued after does.
    let (_, answer) = join(&broker, &old_token, &b, mesh, "bob").await;
    assert_eq!(code_of(&answer), Some(ErrorCode::Revoked), "{answer:?}");
    let new_token = mint_invite(&a, mesh, &broker.url(), now_ms() + 60_000, None);
    let (mut cb, answer) = join(&broker, &new_token, &b, mesh, "bob").await;
    let ServerFrame::Welcome(w) = answer else { panic!("readmitted: {answer:?}") };
    assert_eq!((w.you.role, w.you.invited_by), (Role::Member, Some(a.key())));
    // Nothing of before is waiting for it.
    cb.send(&ClientFrame::Roster(RosterRequest { id: 1, after: None })).await;
    loop {
        match cb.recv().await {
            ServerFrame::Deliver(d) => panic!("nothing queued from before the removal: {d:?}"),
            ServerFrame::Roster(_) => break,
            _ => continue,
        }
    }
    broker.stop().await;
}

async fn roles_follow_the_rules_and_take_effect_at_once(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let TwoMembers { mesh, a, b, mut ca, mut cb } = two_members(&broker).await;
    let (carol, mut cc) = third(&broker, &a, mesh, "carol").await;
    let (dave, _cd) = third(&broker, &a, mesh, "dave").await;
    // A member removes no one, lists no invites, changes no role.
    assert_eq!(
        ask(&mut cb, 1, action(&b, mesh, ChangeKind::Remove, carol.key(), None)).await,
        Err(ErrorCode::Forbidden)
    );
    cb.send(&ClientFrame::Invites(InvitesRequest { id: 2 })).await;
    assert_eq!(answer(&mut cb, 2).await, Err(ErrorCode::Forbidden));
    assert_eq!(
        ask(&mut cb, 3, action(&b, mesh, ChangeKind::SetRole, b.key(), Some(Role::Admin))).await,
        Err(ErrorCode::Forbidden)
    );
    // The owner makes bob an admin: on his same connection, he may now remove a member and list
    // invites, but not remove the owner or another admin, nor change roles.
    assert_eq!(ask(&mut ca, 4, action(&a, mesh, ChangeKind::SetRole, b.key(), Some(Role::Admin))).await, Ok(()));
    assert_eq!(ask(&mut ca, 5, action(&a, mesh, ChangeKind::SetRole, carol.key(), Some(Role::Admin))).await, Ok(()));
    let roles: Vec<(PublicKey, Role)> = {
        cc.send(&ClientFrame::Roster(RosterRequest { id: 6, after: None })).await;
        loop {
            if let ServerFrame::Roster(r) = cc.recv().await {
                break r.peers.into_iter().map(|p| (p.key, p.role)).collect();
            }
        }
    };
    assert!(roles.contains(&(b.key(), Role::Admin)) && roles.contains(&(carol.key(), Role::Admin)), "{roles:?}");
    cb.send(&ClientFrame::Invites(InvitesRequest { id: 7 })).await;
    loop {
        match cb.recv().await {
            ServerFrame::Invites(i) if i.id == 7 => break,
            ServerFrame::Error(e) if e.id == Some(7) => panic!("an admin lists invites: {e:?}"),
            _ => continue,
        }
    }
    assert_eq!(ask(&mut cb, 8, action(&b, mesh, ChangeKind::Remove, a.key(), None)).await, Err(ErrorCode::Forbidden));
    assert_eq!(
        ask(&mut cb, 9, action(&b, mesh, ChangeKind::Remove, carol.key(), None)).await,
        Err(ErrorCode::Forbidden)
    );
    assert_eq!(
        ask(&mut cb, 10, action(&b, mesh, ChangeKind::SetRole, dave.key(), Some(Role::Admin))).await,
        Err(ErrorCode::Forbidden)
    );
    assert_eq!(ask(&mut cb, 11, action(&b, mesh, ChangeKind::Remove, dave.key(), None)).await, Ok(()));
    // Demoted, bob loses it at once.
    assert_eq!(ask(&mut ca, 12, action(&a, mesh, ChangeKind::SetRole, b.key(), Some(Role::Member))).await, Ok(()));
    cb.send(&ClientFrame::Invites(InvitesRequest { id: 13 })).await;
    assert_eq!(answer(&mut cb, 13).await, Err(ErrorCode::Forbidden));
    let limits = ClientFrame::SetLimits(mesh_proto::wire::SetLimitsRequest {
        id: 14,
        connections: Some(5),
        ..Default::default()
    });
    cb.send(&limits).await;
    assert_eq!(answer(&mut cb, 14).await, Err(ErrorCode::Forbidden), "a demoted admin's connection sets no limits");
    // The owner removes an admin.
    assert_eq!(ask(&mut ca, 15, action(&a, mesh, ChangeKind::Remove, carol.key(), None)).await, Ok(()));
    broker.stop().await;
}

async fn a_member_leaves_and_the_owner_hands_ownership_over_first(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let TwoMembers { mesh, a, b, mut ca, mut cb } = two_members(&broker).await;
    let (carol, mut cc) = third(&broker, &a, mesh, "carol").await;
    // Carol leaves: answered, then cut off; the others are told.
    assert_eq!(ask(&mut cc, 1, action(&carol, mesh, ChangeKind::Leave, carol.key(), None)).await, Ok(()));
    let items = deliveries_until(&mut cb, |i| matches!(i, DeliveryItem::Membership(_))).await;
    let Some(DeliveryItem::Membership(n)) = items.last() else { unreachable!() };
    assert_eq!((n.kind, n.target, n.by), (ChangeKind::Leave, carol.key(), carol.key()));
    let (_, answer) = reconnect(&broker, &carol, mesh, "carol").await;
    assert_eq!(code_of(&answer), Some(ErrorCode::Revoked));
    // Leaving is for oneself only.
    assert_eq!(ask(&mut cb, 2, action(&b, mesh, ChangeKind::Leave, a.key(), None)).await, Err(ErrorCode::Forbidden));
    // The owner cannot leave until it hands ownership over.
    assert_eq!(ask(&mut ca, 3, action(&a, mesh, ChangeKind::Leave, a.key(), None)).await, Err(ErrorCode::Forbidden));
    assert_eq!(ask(&mut ca, 4, action(&a, mesh, ChangeKind::SetRole, b.key(), Some(Role::Owner))).await, Ok(()));
    let (_, answer) = reconnect(&broker, &b, mesh, "bob").await;
    let ServerFrame::Welcome(w) = answer else { panic!("{answer:?}") };
    assert_eq!(w.you.role, Role::Owner);
    assert!(w.roster.iter().any(|p| p.key == a.key() && p.role == Role::Admin), "the old owner is an admin");
    assert_eq!(ask(&mut ca, 5, action(&a, mesh, ChangeKind::Leave, a.key(), None)).await, Ok(()));
    broker.stop().await;
}

async fn invites_are_listed_with_their_uses_and_a_revoked_one_is_refused(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let TwoMembers { mesh, a, b, mut ca, mut cb } = two_members(&broker).await;
    let token = mint_invite(&a, mesh, &broker.url(), now_ms() + 60_000, Some(3));
    ca.send(&ClientFrame::RegisterInvite(RegisterInviteRequest { id: 1, invite: token.invite.clone() })).await;
    assert_eq!(answer(&mut ca, 1).await, Ok(()));
    // Only its issuer registers it.
    cb.send(&ClientFrame::RegisterInvite(RegisterInviteRequest { id: 2, invite: token.invite.clone() })).await;
    assert_eq!(answer(&mut cb, 2).await, Err(ErrorCode::Forbidden));
    let (_, answer_c) = join(&broker, &token, &Identity::generate(), mesh, "carol").await;
    assert!(matches!(answer_c, ServerFrame::Welcome(_)));
    let invites = list_invites(&mut ca, 3).await;
    let listed = invites.iter().find(|i| i.invite_id == token.claims.invite_id).expect("listed");
    assert_eq!((listed.uses, listed.max_uses, listed.issued_by, listed.revoked_at), (1, Some(3), a.key(), None));
    // The invite two_members used was never registered: it is listed from its first use.
    assert_eq!(invites.len(), 2, "{invites:?}");

    ca.send(&ClientFrame::RevokeInvite(RevokeInviteRequest { id: 4, invite_id: token.claims.invite_id.clone() })).await;
    assert_eq!(answer(&mut ca, 4).await, Ok(()));
    let (_, refused) = join(&broker, &token, &Identity::generate(), mesh, "dave").await;
    let ServerFrame::Error(e) = &refused else { panic!("{refused:?}") };
    assert_eq!(e.code, ErrorCode::InviteInvalid);
    assert!(e.message.contains("revoked"), "{}", e.message);
    let invites = list_invites(&mut ca, 5).await;
    let listed = invites.iter().find(|i| i.invite_id == token.claims.invite_id).expect("listed");
    assert_eq!((listed.uses, listed.revoked_by), (1, Some(a.key())));
    assert!(listed.revoked_at.is_some());
    ca.send(&ClientFrame::RevokeInvite(RevokeInviteRequest { id: 6, invite_id: "0".repeat(32) })).await;
    assert_eq!(answer(&mut ca, 6).await, Err(ErrorCode::InviteInvalid), "an unknown invite");
    cb.send(&ClientFrame::RevokeInvite(RevokeInviteRequest { id: 7, invite_id: token.claims.invite_id.clone() })).await;
    assert_eq!(answer(&mut cb, 7).await, Err(ErrorCode::Forbidden), "a member revokes nothing");
    let _ = b;
    broker.stop().await;
}

async fn membership_actions_must_be_signed_by_the_connection_s_member_now(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let TwoMembers { mesh, a, b, mut ca, mut cb } = two_members(&broker).await;
    // Bob sends alice's signed removal of bob: not his to send.
    let alice_s = action(&a, mesh, ChangeKind::Remove, b.key(), None);
    assert_eq!(ask(&mut cb, 1, alice_s).await, Err(ErrorCode::Forbidden));
    // A signature that does not verify.
    let mut forged = action(&a, mesh, ChangeKind::Remove, b.key(), None);
    forged.sig = action(&a, mesh, ChangeKind::Remove, a.key(), None).sig;
    assert_eq!(ask(&mut ca, 2, forged).await, Err(ErrorCode::BadSignature));
    // Signed long ago (a replay), or for another mesh.
    let old = Signed::sign(
        &a,
        &MembershipAction {
            v: 1,
            mesh_id: mesh,
            kind: ChangeKind::Remove,
            target: b.key(),
            role: None,
            by: a.key(),
            at: 1,
        },
    );
    assert_eq!(ask(&mut ca, 3, old).await, Err(ErrorCode::Forbidden));
    assert_eq!(
        ask(&mut ca, 4, action(&a, MeshId::generate(), ChangeKind::Remove, b.key(), None)).await,
        Err(ErrorCode::Forbidden)
    );
    // A session's connection changes nothing, even its own member's.
    let session = Identity::generate();
    let (mut cs, hello) = session_hello_answer(&broker, &a, &session, mesh, "worker").await;
    assert!(matches!(hello, ServerFrame::Welcome(_)));
    assert_eq!(ask(&mut cs, 5, action(&a, mesh, ChangeKind::Remove, b.key(), None)).await, Err(ErrorCode::Forbidden));
    // Bob is still a member after all that.
    assert!(roster_keys(&mut ca, 6).await.contains(&b.key()));
    broker.stop().await;
}

async fn new_mesh_keys_follow_the_rules_and_a_broadcast_under_a_replaced_key_is_refused(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let TwoMembers { mesh, a, b, mut ca, mut cb } = two_members(&broker).await;
    let (carol, cc) = third(&broker, &a, mesh, "carol").await;
    let k1 = GroupKey::generate();
    // A member makes no key; the owner makes only the next epoch, for exactly the members.
    cb.send(&rotation(1, &b, mesh, 1, &[&a, &b, &carol], &k1)).await;
    assert_eq!(answer(&mut cb, 1).await, Err(ErrorCode::Forbidden));
    ca.send(&rotation(2, &a, mesh, 0, &[&a, &b, &carol], &k1)).await;
    assert_eq!(answer(&mut ca, 2).await, Err(ErrorCode::RotationConflict), "not a newer epoch");
    ca.send(&rotation(3, &a, mesh, 1, &[&a, &b], &k1)).await;
    assert_eq!(answer(&mut ca, 3).await, Err(ErrorCode::RotationConflict), "carol is missing");
    let stranger = Identity::generate();
    ca.send(&rotation(4, &a, mesh, 1, &[&a, &b, &carol, &stranger], &k1)).await;
    assert_eq!(answer(&mut ca, 4).await, Err(ErrorCode::RotationConflict), "not a member");
    // Someone else's grants, sent by alice: refused.
    cb.send(&rotation(5, &a, mesh, 1, &[&a, &b, &carol], &k1)).await;
    assert_eq!(answer(&mut cb, 5).await, Err(ErrorCode::Forbidden));
    ca.send(&rotation(6, &a, mesh, 1, &[&a, &b, &carol], &k1)).await;
    assert_eq!(answer(&mut ca, 6).await, Ok(()));
    // Bob is told, and his grant (queued for him) opens to the key alice made; the broker held only
    // the sealed grant.
    // The grant's delivery and the key state may come in either order.
    let (mut told, mut item) = (None, None);
    while told.is_none() || item.is_none() {
        match cb.recv().await {
            ServerFrame::KeyState(k) => told = Some(k),
            ServerFrame::Deliver(d) => {
                cb.send(&ClientFrame::Ack(mesh_proto::wire::Ack { delivery_ids: vec![d.delivery_id] })).await;
                if let DeliveryItem::MeshKey(m) = d.item {
                    item = Some(m);
                }
            }
            _ => {}
        }
    }
    assert_eq!(told, Some(KeyState { epoch: 1, rekey_wanted: false }));
    let item = item.expect("a grant");
    let (grant, key) = mesh_proto::membership::open_grant(&item.grant, &b, &mesh).expect("opens for bob");
    assert_eq!((grant.epoch, grant.by, key.as_bytes()), (1, a.key(), k1.as_bytes()));
    // A broadcast under the replaced key is refused, for its sender to seal again; under the current
    // one it goes.
    assert_eq!(broadcast_under(&mut cb, &b, mesh, 7, &GroupKey::generate(), None).await, Err(ErrorCode::StaleKey));
    assert_eq!(broadcast_under(&mut cb, &b, mesh, 8, &k1, Some(1)).await, Ok(()));
    // A removal makes a new key wanted: the others are told, and so is a welcome.
    assert_eq!(ask(&mut ca, 9, action(&a, mesh, ChangeKind::Remove, carol.key(), None)).await, Ok(()));
    assert_eq!(key_state(&mut cb).await, KeyState { epoch: 1, rekey_wanted: true });
    let (mut cb, hello) = reconnect(&broker, &b, mesh, "bob").await;
    let ServerFrame::Welcome(w) = hello else { panic!("{hello:?}") };
    assert_eq!(w.key, KeyState { epoch: 1, rekey_wanted: true });
    drop(cc);
    // The next key, for the two who remain, is no longer wanted once given. Members may hold a later
    // epoch than the broker (it was restored from an older backup): a later epoch is taken too.
    ca.send(&rotation(10, &a, mesh, 5, &[&a, &b], &GroupKey::generate())).await;
    assert_eq!(answer(&mut ca, 10).await, Ok(()));
    assert_eq!(key_state(&mut cb).await, KeyState { epoch: 5, rekey_wanted: false });
    // A member that holds only an older key (its daemon restored from a backup) asks for a new one;
    // one holding the current key changes nothing.
    cb.send(&ClientFrame::KeyWanted(mesh_proto::wire::KeyWantedRequest { id: 11, have: 5 })).await;
    assert_eq!(answer(&mut cb, 11).await, Ok(()));
    cb.send(&ClientFrame::KeyWanted(mesh_proto::wire::KeyWantedRequest { id: 12, have: 3 })).await;
    assert_eq!(answer(&mut cb, 12).await, Ok(()));
    assert_eq!(key_state(&mut ca).await, KeyState { epoch: 5, rekey_wanted: true }, "the owner is told");
    broker.stop().await;
}

async fn the_owner_deletes_the_mesh_and_every_connection_is_cut_off(backend: Backend) {
    let broker = TestBroker::start_on(&backend, BrokerConfig::default()).await;
    let TwoMembers { mesh, a, b, mut ca, mut cb } = two_members(&broker).await;
    assert_eq!(
        ask(&mut cb, 1, action(&b, mesh, ChangeKind::DeleteMesh, b.key(), None)).await,
        Err(ErrorCode::Forbidden)
    );
    assert_eq!(ask(&mut ca, 2, action(&a, mesh, ChangeKind::DeleteMesh, a.key(), None)).await, Ok(()));
    let code = loop {
        match cb.try_recv().await {
            Some(ServerFrame::Error(e)) => break Some(e.code),
            Some(_) => continue,
            None => break None,
        }
    };
    assert_eq!(code, Some(ErrorCode::UnknownMesh), "bob is cut off with the reason");
    for (who, name) in [(&a, "alice"), (&b, "bob")] {
        let (_, answer) = reconnect(&broker, who, mesh, name).await;
        assert_eq!(code_of(&answer), Some(ErrorCode::UnknownMesh), "{answer:?}");
    }
    broker.stop().await;
}
