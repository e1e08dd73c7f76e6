//! Presence: how a peer is shown to the mesh (`Peer` in `welcome`, `roster` and `presence` frames),
//! and telling every other connection of a mesh about one peer. Presence is advisory; the store is
//! the source of truth, and a client that needs it asks for the roster.

use mesh_proto::MeshId;
use mesh_proto::wire::{Peer, Presence, ServerFrame};

use crate::Shared;
use crate::store::{Note, PeerRecord};

/// A peer as the protocol shows it; `groups` only when they are known (rosters) or changed.
pub(crate) fn peer_view(p: &PeerRecord, online: bool, groups: Option<Vec<String>>) -> Peer {
    Peer {
        key: p.key,
        kind: p.kind,
        member: p.member,
        name: p.name.clone(),
        enc_key: p.enc_key,
        enc_sig: p.enc_sig,
        role: p.role,
        online,
        last_seen: p.last_seen,
        groups,
        ended_at: p.ended_at,
        joined_at: Some(p.joined_at),
        invited_by: p.invited_by,
    }
}

/// Tells every connection of `mesh` but `peer`'s own about `peer` (a `presence` frame).
pub(crate) fn announce(shared: &Shared, mesh: MeshId, peer: &PeerRecord, online: bool, removed: bool) {
    announce_view(shared, mesh, peer_view(peer, online, None), removed);
}

pub(crate) fn announce_view(shared: &Shared, mesh: MeshId, peer: Peer, removed: bool) {
    let except = peer.key;
    relay(shared, mesh, except, ServerFrame::Presence(Presence { peer, removed }).to_json());
}

/// Sends `frame` to every connection of `mesh` but `except`'s, here and on the other replicas.
pub(crate) fn relay(shared: &Shared, mesh: MeshId, except: mesh_proto::PublicKey, frame: String) {
    shared.hub.broadcast(mesh, &except, &frame);
    if let Some(cluster) = shared.store.cluster() {
        cluster.publish(Note::Presence { mesh, except, frame });
    }
}
