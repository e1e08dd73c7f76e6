//! mesh-broker: the relay between daemons. Store-and-forward per recipient, idempotent, durable.
//!
//! The only entry point is [`run`]: it takes a bound listener, a [`Store`] and a shutdown token, and
//! returns when shutdown has drained every connection. It never binds ports or reads signals itself, so
//! `mesh broker serve` and the daemon's embedded broker share it unchanged. The broker sees ciphertext,
//! public keys and routing metadata only.

mod admission;
pub mod backup;
mod config;
mod connection;
mod deliver;
pub mod guard;
mod handshake;
mod hub;
mod listener;
pub mod metrics;
mod presence;
mod ratelimit;
pub mod sqlite;
pub mod store;
pub mod tls;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, State, WebSocketUpgrade};
use axum::response::{IntoResponse, Json};
use axum::routing::get;
use mesh_proto::wire::{Presence, ServerFrame};
use mesh_proto::{MeshId, now_ms};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use config::BrokerConfig;
pub use store::Store;
pub use store::sqlite::SqliteStore;

/// Connections waiting for their request on the metrics listener, in all and per address, and new
/// ones per address a second.
const METRICS_PENDING: usize = 64;
const METRICS_PENDING_PER_ADDRESS: usize = 16;
const METRICS_PER_SEC_PER_ADDRESS: u32 = 50;

/// The metrics' content type: `prometheus-client` writes OpenMetrics text.
pub const METRICS_CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// How long shutdown waits for connections to close before giving up on them.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

pub(crate) struct Shared {
    store: Arc<dyn Store>,
    admission: Arc<admission::Admission>,
    config: BrokerConfig,
    hub: hub::Hub,
    limiter: ratelimit::RateLimiter<(mesh_proto::MeshId, mesh_proto::PublicKey)>,
    next_conn: AtomicU64,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    metrics: Arc<metrics::Metrics>,
}

impl Shared {
    fn next_conn_id(&self) -> u64 {
        self.next_conn.fetch_add(1, Ordering::Relaxed)
    }

    /// Wakes the connection of `key`: here, or through the other replicas when it is not here.
    fn wake(&self, mesh: mesh_proto::MeshId, key: &mesh_proto::PublicKey) {
        if !self.hub.wake(mesh, key)
            && let Some(cluster) = self.store.cluster()
        {
            cluster.publish(store::Note::Wake { mesh, key: *key });
        }
    }

    /// Ends the connection of `key` (here, or on another replica) with `revoked`: its key is out of
    /// the mesh, for `why`.
    fn revoke(&self, mesh: mesh_proto::MeshId, key: &mesh_proto::PublicKey, why: &str) {
        if let Some(handle) = self.hub.handle(mesh, key) {
            handle.revoke(why);
        }
        if let Some(cluster) = self.store.cluster() {
            cluster.publish(store::Note::Revoke { mesh, key: *key, why: why.to_owned() });
        }
    }

    /// Ends every connection of `mesh` (here, and on the other replicas): it was deleted.
    fn end_mesh(&self, mesh: mesh_proto::MeshId, why: &str) {
        for handle in self.hub.mesh_handles(mesh) {
            handle.end(mesh_proto::wire::ErrorCode::UnknownMesh, why);
        }
        if let Some(cluster) = self.store.cluster() {
            cluster.publish(store::Note::Deleted { mesh, why: why.to_owned() });
        }
    }

    /// The mesh's connections, each key with its member: here, and on the other replicas sharing the
    /// store (when they cannot be read, the ones here).
    async fn connected(&self, mesh: MeshId) -> std::collections::HashMap<mesh_proto::PublicKey, mesh_proto::PublicKey> {
        let mut connected = self.hub.connected(mesh);
        if let Some(cluster) = self.store.cluster() {
            match cluster.connected(mesh).await {
                Ok(elsewhere) => connected.extend(elsewhere),
                Err(e) => {
                    tracing::warn!(error = %mesh_proto::error::chain(&e), "reading the other replicas' connections")
                }
            }
        }
        connected
    }
}

/// Serves the broker on `listener` until `shutdown` is cancelled, then closes every connection.
pub async fn run(
    listener: tokio::net::TcpListener,
    store: Arc<dyn Store>,
    config: BrokerConfig,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    run_with(listener, store, config, shutdown, Extras::default()).await
}

/// What a broker may serve besides plain WebSockets on its port.
#[derive(Debug, Default)]
pub struct Extras {
    /// Prometheus metrics (`GET /metrics`, plain HTTP) on a listener of their own.
    pub metrics: Option<tokio::net::TcpListener>,
    /// TLS on the main port: `wss://` and `https://…/health`.
    pub tls: Option<Arc<tls::ServerTls>>,
}

/// [`run`], with TLS on the main port and metrics on their own, as `extras` says.
pub async fn run_with(
    listener: tokio::net::TcpListener,
    store: Arc<dyn Store>,
    config: BrokerConfig,
    shutdown: CancellationToken,
    extras: Extras,
) -> std::io::Result<()> {
    let Extras { metrics, tls } = extras;
    let counts = metrics::Metrics::new();
    {
        let counts = counts.clone();
        store.observe_commits(Arc::new(move |size, took| {
            counts.batch_size.observe(size as f64);
            counts.commit_seconds.observe(took.as_secs_f64());
        }));
    }
    // Connection ids only need to be unique among the leases of one store: seed them with the start
    // time so a restarted broker never reuses an id a stale lease still carries.
    let limiter = ratelimit::RateLimiter::new(config.sends_per_sec, config.send_burst);
    let shared = Arc::new(Shared {
        store,
        admission: admission::Admission::new(
            config.max_pending_handshakes,
            config.max_pending_per_address,
            config.handshakes_per_sec_per_address,
        ),
        config,
        hub: hub::Hub::default(),
        limiter,
        next_conn: AtomicU64::new(now_ms() << 16),
        tracker: TaskTracker::new(),
        shutdown: shutdown.clone(),
        metrics: counts,
    });
    shared.tracker.spawn(janitor(shared.clone()));
    // The other replicas hear of this one until its connections have closed (their presence goes
    // out), then it says goodbye.
    let cluster_stop = CancellationToken::new();
    let cluster = shared.store.cluster().map(|cluster| {
        let (events, heard) = tokio::sync::mpsc::unbounded_channel();
        shared.tracker.spawn(cluster_events(shared.clone(), heard));
        cluster.start(events, cluster_stop.clone())
    });
    if let Some(listener) = metrics {
        let app = Router::new().route("/metrics", get(scrape)).with_state(shared.clone());
        tracing::info!(addr = ?listener.local_addr().ok(), "serving metrics");
        // Bounded like the main port before its first request: a few places, a header deadline, so
        // that connections held open on it cannot use up the broker's descriptors.
        let listener = listener::GuardedListener::new(
            listener,
            admission::Admission::new(METRICS_PENDING, METRICS_PENDING_PER_ADDRESS, METRICS_PER_SEC_PER_ADDRESS),
            shared.config.handshake_timeout,
        );
        let app = app.into_make_service_with_connect_info::<listener::Remote>();
        let stop = shutdown.clone();
        shared.tracker.spawn(async move {
            if let Err(e) = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await {
                tracing::error!(error = %e, "the metrics listener failed");
            }
        });
    }
    let app = Router::new()
        .route("/health", get(health))
        .route(mesh_proto::wire::WS_PATH, get(upgrade))
        .with_state(shared.clone());
    tracing::info!(addr = ?listener.local_addr().ok(), "broker listening");
    // Connections before their first request are bounded like those before their hello, with places
    // and a rate of their own.
    let before_request = admission::Admission::new(
        shared.config.max_pending_handshakes,
        shared.config.max_pending_per_address,
        shared.config.handshakes_per_sec_per_address,
    );
    let listener = listener::GuardedListener::new(listener, before_request, shared.config.handshake_timeout)
        .with_tls(tls.as_ref().map(|t| t.acceptor()));
    let app = app.into_make_service_with_connect_info::<listener::Remote>();
    let served = axum::serve(listener, app).with_graceful_shutdown(shutdown.clone().cancelled_owned()).await;
    shutdown.cancel();
    shared.tracker.close();
    if tokio::time::timeout(SHUTDOWN_GRACE, shared.tracker.wait()).await.is_err() {
        tracing::warn!("some connections did not close within the shutdown grace period");
    }
    // The other replicas hear this one leave (its leases free at once) rather than time it out.
    cluster_stop.cancel();
    if let Some(goodbye) = cluster
        && tokio::time::timeout(SHUTDOWN_GRACE, goodbye).await.is_err()
    {
        tracing::warn!("leaving the other replicas took too long; they will time this one out");
    }
    served
}

/// `GET /metrics` on the metrics listener. When the store cannot be read (a database outage) the
/// counters are served without the queue gauges: they are what tells the outage.
async fn scrape(State(shared): State<Arc<Shared>>) -> axum::response::Response {
    let queues = shared.store.queue_stats(now_ms()).await.unwrap_or_else(|e| {
        store::log_failure("reading the queues for metrics (served without them)", &e);
        Vec::new()
    });
    ([(axum::http::header::CONTENT_TYPE, METRICS_CONTENT_TYPE)], shared.metrics.encode(&queues)).into_response()
}

async fn health(State(shared): State<Arc<Shared>>) -> impl IntoResponse {
    Json(serde_json::json!({
        "status": "ok",
        "version": env!("CARGO_PKG_VERSION"),
        "protocol": mesh_proto::PROTOCOL_VERSION,
        "shutting_down": shared.shutdown.is_cancelled(),
    }))
}

async fn upgrade(
    ws: WebSocketUpgrade,
    State(shared): State<Arc<Shared>>,
    ConnectInfo(listener::Remote(from)): ConnectInfo<listener::Remote>,
) -> axum::response::Response {
    // Connections that have not said hello are bounded in all and per address, before they cost a
    // WebSocket's buffers.
    let pending = match shared.admission.admit(from.ip()) {
        Ok(p) => p,
        Err(why) => {
            tracing::debug!(%from, why, "connection refused before the handshake");
            return (axum::http::StatusCode::SERVICE_UNAVAILABLE, why).into_response();
        }
    };
    // The WebSocket layer's hard cap is twice the protocol limit, so frames in between get a typed
    // `frame_too_large` answer on a connection that stays open. Reads start in small chunks (the
    // buffer grows with the frames that come), so a connection that sends nothing costs little.
    let hard_cap = shared.config.max_frame_bytes.saturating_mul(2).max(64 * 1024);
    ws.max_message_size(hard_cap)
        .max_frame_size(hard_cap)
        .read_buffer_size(READ_BUFFER)
        .on_upgrade(move |socket| connection::serve(shared, socket, pending))
        .into_response()
}

/// Bytes a connection reads at a time.
const READ_BUFFER: usize = 16 * 1024;

/// Expires queue items past their TTL (queueing `expired` receipts) on a timer.
async fn janitor(shared: Arc<Shared>) {
    let mut tick = tokio::time::interval(shared.config.janitor_interval);
    loop {
        tokio::select! {
            () = shared.shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match shared.store.expire(now_ms()).await {
            Ok(done) => {
                shared.metrics.expired.inc_by(done.messages_expired);
                shared.metrics.receipts_queued("expired", done.receipts);
                if done.messages_expired + done.receipts_dropped > 0 {
                    tracing::info!(
                        messages = done.messages_expired,
                        receipts = done.receipts_dropped,
                        "expired queue items"
                    );
                }
                for (mesh, sender) in done.woken {
                    shared.wake(mesh, &sender);
                }
            }
            Err(e) => tracing::error!(error = %mesh_proto::error::chain(&e), "janitor pass failed; will retry"),
        }
        reap_sessions(&shared).await;
    }
}

/// Carries out what the other replicas sharing the store tell this one.
async fn cluster_events(shared: Arc<Shared>, mut heard: tokio::sync::mpsc::UnboundedReceiver<store::ClusterEvent>) {
    use store::ClusterEvent;
    loop {
        let event = tokio::select! {
            () = shared.shutdown.cancelled() => return,
            event = heard.recv() => match event { Some(e) => e, None => return },
        };
        match event {
            ClusterEvent::Wake { mesh, key } => {
                shared.hub.wake(mesh, &key);
            }
            ClusterEvent::Kick { mesh, key, conn } => {
                if let Some(handle) = shared.hub.handle(mesh, &key).filter(|h| h.conn_id == conn) {
                    tracing::info!(conn, "superseded by a newer connection of the same key on another replica");
                    handle.supersede();
                }
            }
            ClusterEvent::Presence { mesh, except, frame } => shared.hub.broadcast(mesh, &except, &frame),
            ClusterEvent::Deleted { mesh, why } => {
                for handle in shared.hub.mesh_handles(mesh) {
                    handle.end(mesh_proto::wire::ErrorCode::UnknownMesh, &why);
                }
            }
            ClusterEvent::Revoke { mesh, key, why } => {
                if let Some(handle) = shared.hub.handle(mesh, &key) {
                    tracing::info!(conn = handle.conn_id, "removed from the mesh on another replica");
                    handle.revoke(&why);
                }
            }
            ClusterEvent::Gone { mesh, key } => {
                if shared.hub.is_online(mesh, &key) {
                    continue;
                }
                // Last seen about now: its replica was alive until moments ago.
                let _ = shared.store.touch_peer(mesh, key, now_ms()).await;
                if let Ok(Some(peer)) = shared.store.peer(mesh, key).await {
                    presence::announce(&shared, mesh, &peer, false, false);
                }
            }
            ClusterEvent::Heartbeat { ok } => {
                metrics::Metrics::count(&shared.metrics.heartbeats, if ok { "ok" } else { "failed" });
            }
            ClusterEvent::CatchUp { presence } => {
                shared.hub.wake_all();
                if presence {
                    resync_presence(&shared).await;
                }
            }
            ClusterEvent::Reclaim => {
                let Some(cluster) = shared.store.cluster() else { continue };
                for (mesh, key, handle) in shared.hub.handles() {
                    match cluster.reclaim_connection(mesh, key, handle.member, handle.conn_id).await {
                        Ok(true) => {}
                        Ok(false) => {
                            // Its member connected to another replica while this one was away:
                            // that connection is the live one, this one is left behind.
                            tracing::info!(conn = handle.conn_id, "superseded while this replica was taken for dead");
                            handle.supersede();
                            continue;
                        }
                        Err(e) => {
                            tracing::warn!(error = %mesh_proto::error::chain(&e), "claiming a connection again");
                            continue;
                        }
                    }
                    // The others were told it left when this replica was taken for dead.
                    if let Ok(Some(peer)) = shared.store.peer(mesh, key).await {
                        presence::announce(&shared, mesh, &peer, true, false);
                    }
                }
            }
        }
    }
}

/// Tells every connection here the current presence of its mesh's peers (as stored, online when
/// connected on any replica): after this replica stopped listening to the others for a while, the
/// presence frames they sent meanwhile (a session ended, a member gone) never arrived.
async fn resync_presence(shared: &Shared) {
    let mut meshes: Vec<MeshId> = shared.hub.handles().into_iter().map(|(mesh, _, _)| mesh).collect();
    meshes.sort();
    meshes.dedup();
    for mesh in meshes {
        let Ok(roster) = shared.store.roster(mesh).await else { continue };
        let connected = shared.connected(mesh).await;
        for entry in roster {
            let online = connected.contains_key(&entry.peer.key);
            let view = presence::peer_view(&entry.peer, online, None);
            let frame = ServerFrame::Presence(Presence { peer: view, removed: false }).to_json();
            shared.hub.broadcast(mesh, &entry.peer.key, &frame);
        }
    }
}

/// Ends sessions unseen past the stale period and removes ended ones past the grace period, telling
/// each mesh.
async fn reap_sessions(shared: &Shared) {
    let config = &shared.config;
    let (stale, grace) = (config.session_stale.as_millis() as u64, config.session_grace.as_millis() as u64);
    match shared.store.reap_sessions(now_ms(), stale, grace, shared.hub.online()).await {
        Ok(done) => {
            for (mesh, peer) in &done.ended {
                tracing::info!(mesh = %mesh, session = %peer.name, "session unseen too long; ended");
                presence::announce(shared, *mesh, peer, false, false);
            }
            for (mesh, peer) in &done.removed {
                tracing::info!(mesh = %mesh, session = %peer.name, "ended session left the roster");
                presence::announce(shared, *mesh, peer, false, true);
            }
        }
        Err(e) => tracing::error!(error = %mesh_proto::error::chain(&e), "reaping sessions failed; will retry"),
    }
}
