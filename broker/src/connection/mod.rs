//! One WebSocket connection: challenge, handshake, then an ordered reader loop (frames are handled one
//! at a time, in arrival order), a writer task that owns the socket's sink, and the deliverer
//! ([`crate::deliver`]) that leases the peer's queue and pushes it within a window of unacked items.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::ws::{CloseFrame, Message, WebSocket};
use futures_util::{FutureExt, SinkExt, StreamExt};
use mesh_proto::wire::{
    self, Accepted, ClientFrame, DeliveryItem, Envelope, ErrorCode, ErrorFrame, OkReply, Peer, RosterReply,
    SendMessage, ServerFrame, SetLimitsRequest, Welcome,
};
use mesh_proto::{MeshId, PublicKey, crypto, now_ms};
use tokio::sync::{Notify, mpsc};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

mod membership;

use crate::Shared;
use crate::deliver::deliver_loop;
use crate::handshake::{self, Authenticated};
use crate::hub::{ConnHandle, Outbound};
use crate::metrics::Metrics;
use crate::presence::{announce, announce_view, peer_view};
use crate::store::{MeshLimitSettings, NewMessage, PeerRecord, StoreError};

/// Frames waiting for the socket, per connection. Deliveries wait for room (backpressure); presence
/// frames are skipped when full.
const OUTBOUND_BUFFER: usize = 1024;
const CLOSE_POLICY: u16 = 1008;
const CLOSE_GOING_AWAY: u16 = 1001;
const CLOSE_TOO_BIG: u16 = 1009;
const MAX_CLIENT_MESSAGE_ID: usize = 128;
/// Most frames, and most bytes of them, already received that are handled as one batch: what a peer
/// can make the broker hold at once.
const READ_BATCH: usize = 256;
const READ_BATCH_BYTES: usize = 1024 * 1024;
/// How long a closing connection's writer may take to flush before it is dropped.
const WRITER_GRACE: Duration = Duration::from_secs(5);

pub(crate) async fn serve(shared: Arc<Shared>, socket: WebSocket, pending: crate::admission::Pending) {
    let _task = shared.tracker.token();
    let conn_id = shared.next_conn_id();
    async move {
        let (sink, mut stream) = socket.split();
        let (out_tx, out_rx) = mpsc::channel(OUTBOUND_BUFFER);
        let writer = shared.tracker.spawn(write_loop(sink, out_rx, shared.config.ping_interval));
        let challenge: [u8; 32] = crypto::random_bytes();
        let hello = ServerFrame::Challenge(wire::Challenge { v: mesh_proto::PROTOCOL_VERSION, nonce: challenge.to_vec(), server_time: now_ms().saturating_add_signed(shared.config.clock_offset_ms) });
        if out_tx.send(Outbound::Text(hello.to_json())).await.is_err() {
            return;
        }
        let auth = tokio::select! {
            r = tokio::time::timeout(shared.config.handshake_timeout, read_hello(&shared, &mut stream, &challenge)) => match r {
                Ok(r) => r,
                Err(_) => Err(Some(ErrorFrame::new(ErrorCode::HandshakeTimeout, "no hello within the handshake timeout"))),
            },
            () = shared.shutdown.cancelled() => Err(Some(ErrorFrame::new(ErrorCode::ShuttingDown, "broker is shutting down"))),
            () = pending.evicted() => Err(Some(ErrorFrame::new(
                ErrorCode::Unavailable,
                "too many connections are waiting to authenticate and this one waited longest; retry",
            ))),
        };
        // Authenticated or not, it no longer waits for its hello: its place goes back.
        drop(pending);
        Metrics::count(&shared.metrics.handshakes, match &auth {
            Ok(_) => "ok",
            Err(Some(err)) => err.code.as_str(),
            Err(None) => "closed",
        });
        match auth {
            Ok(auth) => {
                tracing::info!(mesh = %auth.mesh.id, peer = %auth.peer.key.short(), name = %auth.peer.name, "authenticated");
                let name = std::sync::Mutex::new(auth.peer.name.clone());
                Connection { shared: shared.clone(), conn_id, auth, name, out: out_tx }.run(stream).await;
            }
            Err(refusal) => {
                if let Some(err) = refusal {
                    // A storage failure is logged where it happened, at most once a second.
                    if err.code != ErrorCode::Internal {
                        tracing::info!(code = err.code.as_str(), detail = %err.message, "handshake refused");
                    }
                    let _ = out_tx.send(Outbound::Text(ServerFrame::Error(err.clone()).to_json())).await;
                    let _ = out_tx.send(Outbound::Close { code: CLOSE_POLICY, reason: err.code.as_str().to_owned() }).await;
                }
                drop(out_tx);
            }
        }
        // A peer that stopped reading can keep the writer in a socket write: give it a moment, then drop it.
        let abort = writer.abort_handle();
        if tokio::time::timeout(WRITER_GRACE, writer).await.is_err() {
            abort.abort();
        }
    }
    .instrument(tracing::info_span!("conn", id = conn_id))
    .await
}

/// Reads frames until a valid `hello`. Anything else before `welcome` is answered with an error and
/// ends the connection. `Err(None)`: the peer went away.
async fn read_hello(
    shared: &Shared,
    stream: &mut futures_util::stream::SplitStream<WebSocket>,
    challenge: &[u8],
) -> Result<Authenticated, Option<ErrorFrame>> {
    loop {
        let msg = match stream.next().await {
            None | Some(Err(_)) => return Err(None),
            Some(Ok(m)) => m,
        };
        let text = match msg {
            Message::Text(t) => t,
            Message::Binary(_) => {
                return Err(Some(ErrorFrame::new(ErrorCode::BadFrame, "binary frames are not part of protocol v1")));
            }
            Message::Ping(_) | Message::Pong(_) => continue,
            Message::Close(_) => return Err(None),
        };
        if text.len() > shared.config.max_frame_bytes {
            return Err(Some(ErrorFrame::new(ErrorCode::FrameTooLarge, "frame exceeds max_frame_bytes")));
        }
        return match wire::decode_client(&text) {
            Ok(ClientFrame::Hello(hello)) => {
                handshake::authenticate(&*shared.store, &shared.config, challenge, &hello).await.map_err(Some)
            }
            Ok(_) => Err(Some(ErrorFrame::new(ErrorCode::NotAuthenticated, "send hello first"))),
            Err(e) => Err(Some(e.into_error_frame())),
        };
    }
}

async fn write_loop(
    mut sink: futures_util::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::Receiver<Outbound>,
    ping_every: Duration,
) {
    let mut ping = tokio::time::interval_at(Instant::now() + ping_every, ping_every);
    loop {
        let out = tokio::select! {
            out = rx.recv() => out,
            _ = ping.tick() => {
                if sink.send(Message::Ping(Default::default())).await.is_err() { return; }
                continue;
            }
        };
        // Every frame already queued goes out in the same write: one system call, not one per frame.
        let mut next = out;
        loop {
            let written = match next {
                Some(Outbound::Text(text)) => sink.feed(Message::Text(text.into())).await,
                Some(Outbound::Close { code, reason }) => {
                    let _ = sink.send(Message::Close(Some(CloseFrame { code, reason: reason.into() }))).await;
                    return;
                }
                None => {
                    let _ = sink.send(Message::Close(None)).await;
                    return;
                }
            };
            if written.is_err() {
                return;
            }
            match rx.try_recv() {
                Ok(more) => next = Some(more),
                Err(mpsc::error::TryRecvError::Empty) => break,
                Err(mpsc::error::TryRecvError::Disconnected) => next = None,
            }
        }
        if sink.flush().await.is_err() {
            return;
        }
    }
}

struct Connection {
    shared: Arc<Shared>,
    conn_id: u64,
    auth: Authenticated,
    /// The connection's display name: the one it authenticated with, until it renames itself.
    name: std::sync::Mutex<String>,
    out: mpsc::Sender<Outbound>,
}

impl Connection {
    fn mesh(&self) -> MeshId {
        self.auth.mesh.id
    }

    fn key(&self) -> PublicKey {
        self.auth.peer.key
    }

    async fn send_frame(&self, frame: ServerFrame) -> bool {
        self.out.send(Outbound::Text(frame.to_json())).await.is_ok()
    }

    async fn send_error(&self, err: ErrorFrame) -> bool {
        self.send_frame(ServerFrame::Error(err)).await
    }

    /// The peer this connection speaks as, with its current name.
    fn me(&self) -> PeerRecord {
        let name = self.name.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
        PeerRecord { name, ..self.auth.peer.clone() }
    }

    /// One page of the roster in key order, after `after`, and the key to continue after when more
    /// follow: a welcome's size does not grow with the mesh.
    /// `connected` is [`Self::connected`]'s answer.
    async fn roster_page(
        &self,
        after: Option<PublicKey>,
        connected: &HashMap<PublicKey, PublicKey>,
    ) -> Result<(Vec<Peer>, Option<PublicKey>), StoreError> {
        let mesh = self.mesh();
        let mut peers = self.shared.store.roster(mesh).await?;
        peers.sort_by_key(|e| e.peer.key);
        let me = self.key();
        let page = self.shared.config.roster_page.max(1);
        let rest = peers.into_iter().filter(|e| after.is_none_or(|a| e.peer.key > a));
        let mut out: Vec<Peer> = rest
            .take(page + 1)
            .map(|e| {
                let online = e.peer.key == me || connected.contains_key(&e.peer.key);
                peer_view(&e.peer, online, Some(e.groups))
            })
            .collect();
        let next = (out.len() > page).then(|| {
            out.truncate(page);
            out[page - 1].key
        });
        Ok((out, next))
    }

    /// The mesh's connections, each key with its member: here, and on the other replicas sharing the
    /// store (when they cannot be read, the ones here).
    async fn connected(&self) -> HashMap<PublicKey, PublicKey> {
        self.shared.connected(self.mesh()).await
    }

    /// This connection's own groups, as the roster has them.
    async fn my_groups(&self) -> Option<Vec<String>> {
        let peers = self.shared.store.roster(self.mesh()).await.ok()?;
        peers.into_iter().find(|e| e.peer.key == self.key()).map(|e| e.groups)
    }

    /// Why this connection may not join, if it may not. A connection replacing one of the same key
    /// takes no more room. A member's own connection is never refused for the mesh's limit (no member
    /// can lock the others out); each member's connections, its sessions' included, have a limit of
    /// their own.
    fn over_connection_limits(&self, connected: &HashMap<PublicKey, PublicKey>) -> Option<String> {
        if connected.contains_key(&self.key()) {
            return None;
        }
        let peer = &self.auth.peer;
        let limits = self.shared.config.mesh_limits(&self.auth.mesh.limits);
        let most = limits.connections_per_member as usize;
        if connected.values().filter(|m| **m == peer.member).count() >= most {
            return Some(format!(
                "this member already has {most} connections in this mesh, the most one member may hold"
            ));
        }
        let is_session = peer.kind == mesh_proto::wire::PeerKind::Session;
        (is_session && connected.len() >= limits.connections as usize)
            .then(|| "this mesh has reached its connection limit".to_owned())
    }

    async fn run(self, mut stream: futures_util::stream::SplitStream<WebSocket>) {
        let (mesh, key) = (self.mesh(), self.key());
        // Read once: for the limits, then for the welcome's online flags.
        let connected = self.connected().await;
        if let Some(why) = self.over_connection_limits(&connected) {
            self.send_error(ErrorFrame::new(ErrorCode::TooManyConnections, why)).await;
            let _ = self.out.send(Outbound::Close { code: CLOSE_POLICY, reason: "too_many_connections".into() }).await;
            return;
        }
        // Our own groups, so that the mesh hears them with our presence.
        let my_groups = self.my_groups().await;
        let welcome = match self.roster_page(None, &connected).await {
            Ok((roster, roster_next)) => ServerFrame::Welcome(Welcome {
                v: mesh_proto::PROTOCOL_VERSION,
                mesh_id: mesh,
                mesh_name: self.auth.mesh.name.clone(),
                you: peer_view(&self.auth.peer, true, my_groups.clone()),
                roster,
                roster_next,
                limits: self.shared.config.limits(&self.auth.mesh.limits),
                server_time: now_ms().saturating_add_signed(self.shared.config.clock_offset_ms),
                key: wire::KeyState { epoch: self.auth.mesh.key_epoch, rekey_wanted: self.auth.mesh.rekey_wanted },
            }),
            Err(e) => {
                crate::store::log_failure("loading roster for welcome", &e);
                ServerFrame::Error(ErrorFrame::new(ErrorCode::Internal, "storage failure; retry later"))
            }
        };
        let welcomed = matches!(welcome, ServerFrame::Welcome(_));
        // `welcome` answers `hello`: it goes out before this connection is registered, so no presence
        // or delivery can come ahead of it. The roster in it counts this connection as online.
        if !self.send_frame(welcome).await || !welcomed {
            return;
        }
        let kind = crate::metrics::KindLabel { kind: self.auth.peer.kind.as_str() };
        self.shared.metrics.connections.get_or_create(&kind).inc();
        let _open = scopeguard_dec(self.shared.metrics.clone(), kind);
        let wake = Arc::new(Notify::new());
        let kicked = CancellationToken::new();
        let kick_reason = Arc::new(std::sync::OnceLock::new());
        let handle = ConnHandle {
            conn_id: self.conn_id,
            member: self.auth.peer.member,
            wake: wake.clone(),
            outbound: self.out.clone(),
            kicked: kicked.clone(),
            kick_reason: kick_reason.clone(),
        };
        if let Some(previous) = self.shared.hub.register(mesh, key, handle) {
            tracing::info!(previous = previous.conn_id, "superseding an older connection of the same key");
            previous.supersede();
        }
        // On another replica, an older connection of this key is superseded by that replica.
        if let Some(cluster) = self.shared.store.cluster()
            && let Err(e) = cluster.claim_connection(mesh, key, self.auth.peer.member, self.conn_id).await
        {
            tracing::warn!(error = %mesh_proto::error::chain(&e), "recording the connection for the other replicas");
        }

        // A removal that committed between the handshake and the registration above found no
        // connection to end: look again now that this one can be found.
        match self.shared.store.peer(mesh, key).await {
            Ok(Some(p)) if !p.revoked => {}
            Ok(_) => {
                let _ = kick_reason.set("revoked");
                let err = ErrorFrame::new(ErrorCode::Revoked, "removed from this mesh while connecting");
                self.send_error(err).await;
                kicked.cancel();
            }
            Err(e) => crate::store::log_failure("checking a new connection's membership", &e),
        }
        for gone in &self.auth.claimed.reaped {
            announce(&self.shared, mesh, gone, false, true);
        }
        if self.auth.joined {
            // A joiner whose invite holds an older key needs the current one: a new key is wanted.
            self.tell_key_state(key, true).await;
        }
        announce_view(&self.shared, mesh, peer_view(&self.me(), true, my_groups), false);
        let (acked_tx, acked_rx) = mpsc::unbounded_channel();
        let stop_delivery = CancellationToken::new();
        let deliverer = self.shared.tracker.spawn(
            deliver_loop(
                self.shared.clone(),
                mesh,
                key,
                self.conn_id,
                wake,
                acked_rx,
                self.out.clone(),
                stop_delivery.clone(),
            )
            .in_current_span(),
        );
        self.read_loop(&mut stream, &kicked, &kick_reason, &acked_tx).await;
        stop_delivery.cancel();
        let _ = deliverer.await;

        if let Some(cluster) = self.shared.store.cluster()
            && let Err(e) = cluster.drop_connection(mesh, key, self.conn_id).await
        {
            tracing::warn!(error = %mesh_proto::error::chain(&e), "forgetting the connection; it leaves with this replica");
        }
        if self.shared.hub.unregister(mesh, key, self.conn_id) && !self.connected_elsewhere().await {
            let _ = self.shared.store.touch_peer(mesh, key, now_ms()).await;
            // As stored now: seen just now, and (a session) perhaps ended while this connection lasted.
            match self.shared.store.peer(mesh, key).await {
                // Out of the mesh (removed, or it left): the mesh was told it left the roster.
                Ok(Some(peer)) if peer.revoked => {}
                Ok(None) => {}
                Ok(Some(peer)) => {
                    announce(&self.shared, mesh, &PeerRecord { name: self.me().name, ..peer }, false, false)
                }
                Err(_) => self.announce(false),
            }
        }
        match self.shared.store.release(mesh, key, self.conn_id).await {
            // A newer connection of this key may be waiting for exactly these items.
            Ok(()) => self.shared.wake(mesh, &key),
            Err(e) => {
                tracing::warn!(error = %mesh_proto::error::chain(&e), "releasing leases; they will expire on their own")
            }
        }
        tracing::info!("connection closed");
    }

    /// Whether this connection's key is connected on another replica now (it was superseded there, or
    /// moved there while this replica was taken for dead): then its leaving here is no news.
    async fn connected_elsewhere(&self) -> bool {
        let Some(cluster) = self.shared.store.cluster() else { return false };
        match cluster.connected(self.mesh()).await {
            Ok(keys) => keys.iter().any(|(k, _)| *k == self.key()),
            Err(_) => false,
        }
    }

    fn announce(&self, online: bool) {
        announce(&self.shared, self.mesh(), &self.me(), online, false);
    }

    async fn read_loop(
        &self,
        stream: &mut futures_util::stream::SplitStream<WebSocket>,
        kicked: &CancellationToken,
        kick_reason: &std::sync::OnceLock<&'static str>,
        acked: &mpsc::UnboundedSender<Vec<u64>>,
    ) {
        loop {
            let next = tokio::select! {
                next = tokio::time::timeout(self.shared.config.idle_timeout, stream.next()) => next,
                () = kicked.cancelled() => {
                    let reason = kick_reason.get().copied().unwrap_or("superseded");
                    let _ = self.out.try_send(Outbound::Close { code: CLOSE_POLICY, reason: reason.into() });
                    return;
                }
                () = self.shared.shutdown.cancelled() => {
                    self.send_error(ErrorFrame::new(ErrorCode::ShuttingDown, "broker is shutting down")).await;
                    let _ = self.out.send(Outbound::Close { code: CLOSE_GOING_AWAY, reason: "shutting_down".into() }).await;
                    return;
                }
            };
            let first = match next {
                Err(_) => {
                    tracing::info!("closing an idle connection");
                    let _ = self.out.try_send(Outbound::Close { code: CLOSE_GOING_AWAY, reason: "idle".into() });
                    return;
                }
                Ok(r) => r,
            };
            // The frames already received are handled as one batch, in order: consecutive sends among
            // them are committed together (one transaction) and answered in order.
            let mut bytes = frame_len(&first);
            let mut batch = vec![first];
            while batch.len() < READ_BATCH && bytes < READ_BATCH_BYTES && matches!(batch.last(), Some(Some(Ok(_)))) {
                match stream.next().now_or_never() {
                    Some(r) => {
                        bytes += frame_len(&r);
                        batch.push(r);
                    }
                    None => break,
                }
            }
            let mut sends = Vec::new();
            for read in batch {
                let keep_going = match read {
                    None | Some(Ok(Message::Close(_))) => false,
                    Some(Err(e)) => {
                        self.flush_sends(&mut sends).await;
                        self.read_failed(e).await;
                        return;
                    }
                    Some(Ok(Message::Text(text))) => self.handle_text(&text, acked, &mut sends).await,
                    Some(Ok(Message::Binary(_))) => {
                        self.flush_sends(&mut sends).await
                            && self
                                .send_error(ErrorFrame::new(
                                    ErrorCode::BadFrame,
                                    "binary frames are not part of protocol v1",
                                ))
                                .await
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => true,
                };
                if !keep_going {
                    self.flush_sends(&mut sends).await;
                    return;
                }
            }
            if !self.flush_sends(&mut sends).await {
                return;
            }
        }
    }

    /// The socket failed: oversized frames are refused by the WebSocket layer before we see them.
    async fn read_failed(&self, e: axum::Error) {
        tracing::info!(error = %mesh_proto::error::chain(&e), "websocket read failed");
        if is_capacity_error(e) {
            self.send_error(ErrorFrame::new(ErrorCode::FrameTooLarge, "frame exceeds the broker's hard limit")).await;
            let _ = self.out.send(Outbound::Close { code: CLOSE_TOO_BIG, reason: "frame_too_large".into() }).await;
        }
    }

    /// Handles one text frame; false when the connection should end. A valid send is staged in `sends`;
    /// anything else is answered after the staged sends are committed and answered.
    async fn handle_text(
        &self,
        text: &str,
        acked: &mpsc::UnboundedSender<Vec<u64>>,
        sends: &mut Vec<(u64, NewMessage)>,
    ) -> bool {
        let frame =
            if text.len() > self.shared.config.max_frame_bytes { None } else { Some(wire::decode_client(text)) };
        // Everything but a send is answered after the staged sends, to keep replies in order.
        if !matches!(frame, Some(Ok(ClientFrame::Send(_)))) && !self.flush_sends(sends).await {
            return false;
        }
        let Some(frame) = frame else {
            // Answer with the request's id, so the sender can settle that request.
            #[derive(serde::Deserialize)]
            struct IdOnly {
                id: Option<u64>,
            }
            let id = serde_json::from_str::<IdOnly>(text).ok().and_then(|h| h.id);
            return self
                .send_error(
                    ErrorFrame::new(
                        ErrorCode::FrameTooLarge,
                        format!(
                            "frame of {} bytes exceeds max_frame_bytes {}",
                            text.len(),
                            self.shared.config.max_frame_bytes
                        ),
                    )
                    .with_id(id),
                )
                .await;
        };
        match frame {
            Err(e) => self.send_error(e.into_error_frame()).await,
            Ok(ClientFrame::Hello(_)) => {
                self.send_error(ErrorFrame::new(
                    ErrorCode::AlreadyAuthenticated,
                    "this connection is already authenticated",
                ))
                .await
            }
            Ok(ClientFrame::Send(send)) => self.stage_or_answer(send, sends).await,
            Ok(ClientFrame::Ack(ack)) => {
                let ids = ack.delivery_ids;
                match self.shared.store.ack(self.mesh(), self.key(), ids.clone(), now_ms()).await {
                    Ok(done) => {
                        self.shared.metrics.acks.inc_by(ids.len() as u64);
                        self.shared.metrics.receipts_queued("delivered", done.receipts);
                        for sender in done.woken {
                            self.shared.wake(self.mesh(), &sender);
                        }
                        let _ = acked.send(ids);
                        true
                    }
                    Err(e) => {
                        crate::store::log_failure("recording acks; the deliveries will be sent again", &e);
                        self.send_error(ErrorFrame::new(
                            ErrorCode::Internal,
                            "could not record the ack; it will be redelivered",
                        ))
                        .await
                    }
                }
            }
            Ok(ClientFrame::Roster(req)) => match self.roster_page(req.after, &self.connected().await).await {
                Ok((peers, next)) => {
                    self.send_frame(ServerFrame::Roster(RosterReply { id: req.id, peers, next })).await
                }
                Err(e) => {
                    crate::store::log_failure("loading roster", &e);
                    self.send_error(ErrorFrame::new(ErrorCode::Internal, "storage failure").with_id(Some(req.id))).await
                }
            },
            Ok(ClientFrame::Read(req)) => {
                let result = self.shared.store.record_reads(self.mesh(), self.key(), req.message_ids, now_ms()).await;
                self.answer(
                    req.id,
                    result.map(|done| {
                        self.shared.metrics.receipts_queued("read", done.receipts);
                        for sender in done.woken {
                            self.shared.wake(self.mesh(), &sender);
                        }
                    }),
                )
                .await
            }
            Ok(ClientFrame::JoinGroup(req) | ClientFrame::LeaveGroup(req))
                if mesh_proto::names::validate_group(&req.group).is_err() =>
            {
                self.send_error(
                    ErrorFrame::new(
                        ErrorCode::InvalidName,
                        format!("group {:?}: use 1-64 of a-z 0-9 - _ .", req.group),
                    )
                    .with_id(Some(req.id)),
                )
                .await
            }
            Ok(ClientFrame::JoinGroup(req)) => self.set_group(req.id, req.group, true).await,
            Ok(ClientFrame::LeaveGroup(req)) => self.set_group(req.id, req.group, false).await,
            Ok(ClientFrame::Rename(req)) => self.rename(req.id, req.name).await,
            Ok(ClientFrame::EndSession(req)) => self.end_session(req.id, req.key).await,
            Ok(ClientFrame::SetLimits(req)) => self.set_limits(req).await,
            Ok(ClientFrame::RegisterInvite(req)) => self.register_invite(req).await,
            Ok(ClientFrame::Invites(req)) => self.list_invites(req.id).await,
            Ok(ClientFrame::RevokeInvite(req)) => self.revoke_invite(req).await,
            Ok(ClientFrame::Membership(req)) => self.change_membership(req).await,
            Ok(ClientFrame::RotateKey(req)) => self.rotate_key(req).await,
            Ok(ClientFrame::KeyWanted(req)) => self.key_wanted(req.id, req.have).await,
        }
    }

    /// Joins or leaves a group, and tells the mesh this peer's groups now.
    async fn set_group(&self, id: u64, group: String, member: bool) -> bool {
        match self.shared.store.set_group(self.mesh(), self.key(), group, member).await {
            Ok(groups) => {
                announce_view(&self.shared, self.mesh(), peer_view(&self.me(), true, Some(groups)), false);
                self.answer(id, Ok(())).await
            }
            Err(e) => self.answer(id, Err(e)).await,
        }
    }

    async fn rename(&self, id: u64, name: String) -> bool {
        if let Err(e) = mesh_proto::names::validate_display(&name) {
            return self.send_error(ErrorFrame::new(ErrorCode::InvalidName, e.to_string()).with_id(Some(id))).await;
        }
        match self.shared.store.rename(self.mesh(), self.key(), name.clone()).await {
            Ok((_, claimed)) => {
                *self.name.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = name;
                for gone in &claimed.reaped {
                    announce(&self.shared, self.mesh(), gone, false, true);
                }
                self.announce(true);
                self.answer(id, Ok(())).await
            }
            Err(e @ StoreError::NameTaken { .. }) => {
                let err = ErrorFrame::new(ErrorCode::NameTaken, format!("{e}; choose another name"));
                self.send_error(err.with_id(Some(id))).await
            }
            Err(e) => self.answer(id, Err(e)).await,
        }
    }

    /// A member says one of its sessions ended: it stops counting as a recipient of broadcasts and
    /// group messages, and the mesh is told.
    async fn end_session(&self, id: u64, session: PublicKey) -> bool {
        if self.auth.peer.kind != mesh_proto::wire::PeerKind::Member {
            let err = ErrorFrame::new(ErrorCode::Forbidden, "only a member's connection can end its sessions");
            return self.send_error(err.with_id(Some(id))).await;
        }
        // As many ended sessions stay in the roster as the member may have live ones.
        let keep = self.shared.config.mesh_limits(&self.auth.mesh.limits).sessions_per_member as usize;
        match self.shared.store.end_session(self.mesh(), self.key(), session, now_ms(), keep).await {
            Ok(done) => {
                if let Some(peer) = done.ended {
                    let online = self.shared.hub.is_online(self.mesh(), &peer.key);
                    announce(&self.shared, self.mesh(), &peer, online, false);
                }
                for gone in &done.removed {
                    announce(&self.shared, self.mesh(), gone, false, true);
                }
                self.answer(id, Ok(())).await
            }
            Err(StoreError::Forbidden(why)) => {
                self.send_error(ErrorFrame::new(ErrorCode::Forbidden, why).with_id(Some(id))).await
            }
            Err(e) => self.answer(id, Err(e)).await,
        }
    }

    /// An owner or admin changes the mesh's limits, each within the broker's. They apply to
    /// sessions and connections that come after; none already in is closed.
    async fn set_limits(&self, req: SetLimitsRequest) -> bool {
        // The role as stored now, not as it was when this connection said hello.
        let me = match self.shared.store.peer(self.mesh(), self.key()).await {
            Ok(Some(me)) if !me.revoked => me,
            Ok(_) => {
                let err = ErrorFrame::new(ErrorCode::Forbidden, "this key is not in the mesh any more");
                return self.send_error(err.with_id(Some(req.id))).await;
            }
            Err(e) => return self.answer(req.id, Err(e)).await,
        };
        if me.kind != mesh_proto::wire::PeerKind::Member || !me.role.is_admin() {
            let err = ErrorFrame::new(ErrorCode::Forbidden, "only the mesh's owner and admins can change its limits");
            return self.send_error(err.with_id(Some(req.id))).await;
        }
        let broker = self.shared.config.broker_mesh_limits();
        let asked = [
            ("sessions_per_member", req.sessions_per_member, broker.sessions_per_member),
            ("connections_per_member", req.connections_per_member, broker.connections_per_member),
            ("connections", req.connections, broker.connections),
        ];
        for (what, value, most) in asked {
            if let Some(v) = value.filter(|v| !(1..=most).contains(v)) {
                let err =
                    ErrorFrame::new(ErrorCode::LimitOutOfRange, format!("{what} {v}: this broker allows 1 to {most}"));
                return self.send_error(err.with_id(Some(req.id))).await;
            }
        }
        let change = MeshLimitSettings {
            sessions_per_member: req.sessions_per_member,
            connections_per_member: req.connections_per_member,
            connections: req.connections,
        };
        match self.shared.store.set_mesh_limits(self.mesh(), req.reset, change).await {
            Ok(now) => {
                let limits = self.shared.config.mesh_limits(&now);
                tracing::info!(mesh = %self.mesh(), by = %self.key(), ?limits, "mesh limits changed");
                self.answer(req.id, Ok(())).await
            }
            Err(e) => self.answer(req.id, Err(e)).await,
        }
    }

    /// Answers request `id` with `ok`, or with `internal` when the store failed.
    async fn answer(&self, id: u64, result: Result<(), StoreError>) -> bool {
        match result {
            Ok(()) => self.send_frame(ServerFrame::Ok(OkReply { id })).await,
            Err(e) => {
                crate::store::log_failure("storage failure", &e);
                self.send_error(ErrorFrame::new(ErrorCode::Internal, "storage failure; retry").with_id(Some(id))).await
            }
        }
    }

    /// Counts a send's answer for the metrics.
    fn count_send<T>(&self, reply: &Result<T, ErrorFrame>) {
        Metrics::count(
            &self.shared.metrics.sends,
            match reply {
                Ok(_) => "accepted",
                Err(err) => err.code.as_str(),
            },
        );
    }

    /// Stages a valid send in `sends`, or answers it at once (after the sends staged before it) when
    /// it is refused or over the rate limit.
    async fn stage_or_answer(&self, send: SendMessage, sends: &mut Vec<(u64, NewMessage)>) -> bool {
        let id = send.id;
        let refusal = match self.stage(send) {
            Ok(msg) => {
                sends.push((id, msg));
                return true;
            }
            Err(refusal) => refusal,
        };
        if !self.flush_sends(sends).await {
            return false;
        }
        let reply = match refusal {
            Refusal::Invalid(err) => Err(err),
            Refusal::RateLimited { send, retry_after_ms } => self.over_limit(*send, retry_after_ms).await,
        };
        self.count_send(&reply);
        self.send_frame(match reply {
            Ok(accepted) => ServerFrame::Accepted(accepted),
            Err(err) => ServerFrame::Error(err.with_id(Some(id))),
        })
        .await
    }

    /// Validates a send and takes its rate-limit token; returns the message to store.
    fn stage(&self, send: SendMessage) -> Result<NewMessage, Refusal> {
        let bad = |m: &str| Refusal::Invalid(ErrorFrame::new(ErrorCode::BadFrame, m.to_owned()));
        let cmid = &send.client_message_id;
        if cmid.is_empty() || cmid.len() > MAX_CLIENT_MESSAGE_ID || cmid.chars().any(char::is_control) {
            return Err(bad("client_message_id must be 1-128 printable characters"));
        }
        if send.nonce.len() != crypto::NONCE_LEN {
            return Err(bad("nonce must be 24 bytes"));
        }
        if send.ciphertext.len() < 16 {
            return Err(bad("ciphertext is shorter than its authentication tag"));
        }
        let config = &self.shared.config;
        let ttl = match send.ttl_ms {
            None | Some(0) => config.default_ttl_ms,
            Some(t) => t.min(config.max_ttl_ms),
        };
        let peer = &self.auth.peer;
        if let Err(retry_after_ms) = self.shared.limiter.try_take((self.mesh(), peer.member)) {
            return Err(Refusal::RateLimited { send: Box::new(send), retry_after_ms });
        }
        let now = now_ms();
        let fingerprint = send.fingerprint();
        let message_id = uuid::Uuid::now_v7().to_string();
        let envelope = Envelope {
            message_id: message_id.clone(),
            mesh_id: self.mesh(),
            from: peer.key,
            from_member: peer.member,
            from_enc_key: peer.enc_key,
            from_enc_sig: peer.enc_sig,
            from_name: self.name.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
            to: send.to.clone(),
            client_message_id: send.client_message_id.clone(),
            nonce: send.nonce,
            ciphertext: send.ciphertext,
            sig: send.sig,
            sent_at: now,
            expires_at: now + ttl,
        };
        let item_json = serde_json::to_string(&DeliveryItem::Message(envelope)).expect("envelopes serialise");
        Ok(NewMessage {
            mesh_id: self.mesh(),
            sender: peer.key,
            client_message_id: send.client_message_id,
            fingerprint,
            target: send.to,
            message_id,
            key_epoch: send.key_epoch,
            item_json,
            created_at: now,
            expires_at: now + ttl,
        })
    }

    /// A send over the rate limit: a resend of an accepted message is answered, never refused (dedupe
    /// before limiting).
    async fn over_limit(&self, send: SendMessage, retry_after_ms: u64) -> Result<Accepted, ErrorFrame> {
        let fingerprint = send.fingerprint();
        match self.shared.store.find_sent(self.mesh(), self.key(), &send.client_message_id).await {
            Ok(Some(sent)) if sent.fingerprint == fingerprint => {
                Ok(Accepted { id: send.id, message_id: sent.message_id, duplicate: true, recipients: sent.recipients })
            }
            Ok(Some(_)) => Err(enqueue_refusal(StoreError::IdempotencyConflict(send.client_message_id))),
            Ok(None) => Err(ErrorFrame {
                retry_after_ms: Some(retry_after_ms),
                ..ErrorFrame::new(
                    ErrorCode::RateLimited,
                    format!("over {} sends per second; retry later", self.shared.config.sends_per_sec),
                )
            }),
            Err(e) => {
                crate::store::log_failure("idempotency lookup failed", &e);
                Err(ErrorFrame::new(ErrorCode::Internal, "storage failure; retry"))
            }
        }
    }

    /// Commits the staged sends together, wakes their recipients and answers each in order. False when
    /// the connection's writer is gone.
    async fn flush_sends(&self, sends: &mut Vec<(u64, NewMessage)>) -> bool {
        if sends.is_empty() {
            return true;
        }
        let (ids, msgs): (Vec<u64>, Vec<NewMessage>) = std::mem::take(sends).into_iter().unzip();
        let results: Vec<Result<_, ErrorFrame>> = match self.shared.store.enqueue_many(msgs).await {
            Ok(results) => results.into_iter().map(|r| r.map_err(enqueue_refusal)).collect(),
            Err(e) => {
                crate::store::log_failure("enqueue failed", &e);
                ids.iter().map(|_| Err(ErrorFrame::new(ErrorCode::Internal, "storage failure; retry"))).collect()
            }
        };
        let mut open = true;
        for (id, result) in ids.into_iter().zip(results) {
            self.count_send(&result);
            let reply = match result {
                Ok(done) => {
                    for key in &done.woken {
                        self.shared.wake(self.mesh(), key);
                    }
                    ServerFrame::Accepted(Accepted {
                        id,
                        message_id: done.message_id,
                        duplicate: done.duplicate,
                        recipients: done.recipients,
                    })
                }
                Err(err) => ServerFrame::Error(err.with_id(Some(id))),
            };
            open = open && self.send_frame(reply).await;
        }
        open
    }
}

/// Counts a connection as closed when dropped, however its run ends.
fn scopeguard_dec(metrics: Arc<crate::metrics::Metrics>, kind: crate::metrics::KindLabel) -> impl Drop {
    struct Open(Arc<crate::metrics::Metrics>, crate::metrics::KindLabel);
    impl Drop for Open {
        fn drop(&mut self) {
            self.0.connections.get_or_create(&self.1).dec();
        }
    }
    Open(metrics, kind)
}

/// Why a send was not staged.
enum Refusal {
    Invalid(ErrorFrame),
    RateLimited { send: Box<SendMessage>, retry_after_ms: u64 },
}

/// The error frame for a send the store refused.
fn enqueue_refusal(e: StoreError) -> ErrorFrame {
    match e {
        StoreError::IdempotencyConflict(c) => ErrorFrame::new(
            ErrorCode::IdempotencyConflict,
            format!("client_message_id {c:?} was already used for a different message"),
        ),
        StoreError::RecipientUnknown(r) => {
            ErrorFrame::new(ErrorCode::RecipientUnknown, format!("no such recipient in this mesh: {r}"))
        }
        e @ StoreError::StaleKey { .. } => ErrorFrame::new(ErrorCode::StaleKey, format!("{e}: seal it again")),
        e => {
            crate::store::log_failure("enqueue failed", &e);
            ErrorFrame::new(ErrorCode::Internal, "storage failure; retry")
        }
    }
}

fn frame_len(read: &Option<Result<Message, axum::Error>>) -> usize {
    match read {
        Some(Ok(Message::Text(t))) => t.len(),
        Some(Ok(Message::Binary(b))) => b.len(),
        _ => 0,
    }
}

/// Whether the WebSocket layer refused a frame for its size.
fn is_capacity_error(e: axum::Error) -> bool {
    use tokio_tungstenite::tungstenite::Error;
    e.into_inner().downcast_ref::<Error>().is_some_and(|e| matches!(e, Error::Capacity(_)))
}
