//! A broker link: the one WebSocket of one identity (the member, or later a session) in one mesh,
//! owned by a state machine from construction: `connecting → online → offline → connecting …`, or
//! `rejected` when the broker refuses permanently (then retried slowly, since an admin may fix it).
//!
//! While online, a link runs three parts: a reader that commits deliveries and receipts and acks them,
//! a writer that owns the socket's sink, and the outbox drain for this identity ([`crate::drain`]).
//! Rows of this identity are sent on this socket only.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{FutureExt, SinkExt, StreamExt};
use mesh_ipc::api::{ConnectionEvent, EventBody, LinkState, LinkStatus, PresenceEvent};
use mesh_proto::pin::CertPin;
use mesh_proto::signed::Signed;
use mesh_proto::wire::{
    self, Ack, ClientFrame, DeliveryItem, ErrorCode, ErrorFrame, Hello, HelloClaims, Intent, Limits, ServerFrame,
    Welcome,
};
use mesh_proto::{Identity, MeshId, codec};
use rand::Rng;
use tokio::net::TcpStream;
use tokio::sync::{Notify, mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::clock::now_ms;
use crate::daemon::Daemon;
use crate::drain::{self, LinkRequest, Reply};
use crate::tls::{CertError, Trust};
use crate::{events, inbox, outbox, roster};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A ping this often: a live broker answers with a pong, so a silent one is noticed within
/// [`STALE_AFTER`] (a frozen replica, a cut network) and the link moves to the next address.
const PING_EVERY: Duration = Duration::from_secs(10);
/// No frame (not even a pong) for this long: the connection is dead.
const STALE_AFTER: Duration = Duration::from_secs(30);
const RECONNECT_MIN_MS: u64 = 500;
const RECONNECT_MAX_MS: u64 = 30_000;
const REJECTED_RETRY: Duration = Duration::from_secs(60);
/// How long a closing link's writer may take to flush before it is dropped.
const WRITER_GRACE: Duration = Duration::from_secs(5);
/// Deliveries committed in one transaction and acked in one frame, at most.
const INTAKE_BATCH: usize = 256;

#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("cannot reach the broker at {url}: {detail}")]
    Unreachable { url: String, detail: String },
    #[error("the broker refused: {}: {}", .0.code.as_str(), .0.message)]
    Refused(ErrorFrame),
    #[error("unexpected answer from the broker: {0}")]
    Protocol(String),
    /// The broker's TLS certificate was refused (a pin that does not match, an expired certificate…).
    #[error("{0}")]
    Certificate(#[from] CertError),
}

/// The broker one connection goes to, and how its certificate is checked.
#[derive(Clone, Copy, Debug)]
pub struct Broker<'a> {
    /// `ws://` or `wss://`; or several such addresses of one mesh's replicas, comma-separated, tried
    /// in order until one answers.
    pub url: &'a str,
    /// For `wss://`: the certificate's pin, else the platform's roots decide.
    pub pin: Option<CertPin>,
    /// The mesh's local name, for what a refusal tells the user to do.
    pub mesh: &'a str,
}

/// The WebSocket URL for a broker address: `ws://host:port` (or `wss://`) gets the `/v1/ws` path.
pub fn ws_endpoint(url: &str) -> Result<String, String> {
    let rest = url
        .strip_prefix("ws://")
        .or_else(|| url.strip_prefix("wss://"))
        .ok_or_else(|| format!("broker address {url:?} must start with wss:// (or ws://)"))?;
    if rest.is_empty() {
        return Err(format!("broker address {url:?} has no host"));
    }
    // It travels in every invite and every listing: no secret belongs in it (nor in this message).
    let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if let Some((_, host)) = authority.rsplit_once('@') {
        let scheme = if url.starts_with("wss://") { "wss" } else { "ws" };
        return Err(format!("broker address {scheme}://…@{host}: no user name or password in a broker address"));
    }
    let full = match rest.find('/') {
        None => format!("{url}{}", wire::WS_PATH),
        Some(i) if &rest[i..] == "/" => format!("{}{}", url.trim_end_matches('/'), wire::WS_PATH),
        Some(_) => url.to_owned(),
    };
    let uri = full
        .parse::<tokio_tungstenite::tungstenite::http::Uri>()
        .map_err(|e| format!("broker address {url:?}: {e}"))?;
    if uri.host().is_none_or(str::is_empty) {
        return Err(format!("broker address {url:?} has no host"));
    }
    if let Some(port) = uri.authority().and_then(|a| a.as_str().rsplit_once(':')).map(|(_, p)| p)
        && !port.ends_with(']')
        && (!matches!(port.parse::<u16>(), Ok(1..))
            || !port.bytes().all(|b| b.is_ascii_digit())
            || port.starts_with('0'))
    {
        return Err(format!("broker address {url:?}: {port:?} is not a port (1 to 65535)"));
    }
    if uri.query().is_some() || full.contains('#') {
        return Err(format!("broker address {url:?}: no query or fragment in a broker address"));
    }
    let host = uri.host().unwrap_or_default();
    if full.starts_with("wss://")
        && rustls::pki_types::ServerName::try_from(host.trim_start_matches('[').trim_end_matches(']')).is_err()
    {
        return Err(format!("broker address {url:?}: {host:?} is neither a host name nor an IP address"));
    }
    Ok(full)
}

/// Most addresses one mesh's broker may have.
pub const MAX_ADDRESSES: usize = 16;

/// The addresses of a broker address list (`wss://a:7777,wss://b:7777`), in order.
pub fn addresses(list: &str) -> impl Iterator<Item = &str> {
    list.split(',').map(str::trim).filter(|a| !a.is_empty())
}

/// A broker address list as stored: each address checked ([`ws_endpoint`]) with its scheme in lower
/// case, at most [`MAX_ADDRESSES`], no repeats, all `wss://` or all `ws://` (one mesh's replicas are
/// verified one way).
pub fn address_list(list: &str) -> Result<String, String> {
    let all: Vec<String> = addresses(list).map(normalize_scheme).collect();
    if all.is_empty() {
        return Err("no broker address given".into());
    }
    if all.len() > MAX_ADDRESSES {
        return Err(format!("{} broker addresses; at most {MAX_ADDRESSES}", all.len()));
    }
    let mut endpoints = Vec::with_capacity(all.len());
    for a in &all {
        let endpoint = ws_endpoint(a)?;
        // `ws://h:1` and `ws://h:1/` are one address.
        if endpoints.contains(&endpoint) {
            return Err(format!("broker address {a:?} is listed twice"));
        }
        endpoints.push(endpoint);
    }
    if all.iter().any(|a| a.starts_with("wss://")) && all.iter().any(|a| a.starts_with("ws://")) {
        return Err("the broker addresses mix wss:// and ws://; one mesh's replicas all speak TLS or none".into());
    }
    Ok(all.join(","))
}

/// `list` starting from its address `first` (wrapping round): the order the next connection tries.
pub fn rotated(list: &str, first: usize) -> String {
    let all: Vec<&str> = addresses(list).collect();
    if all.is_empty() {
        return list.to_owned();
    }
    let first = first % all.len();
    all[first..].iter().chain(&all[..first]).copied().collect::<Vec<_>>().join(",")
}

/// A broker address with its scheme in lower case (`WSS://h` is `wss://h`); anything else as typed.
pub fn normalize_scheme(url: &str) -> String {
    for scheme in ["wss://", "ws://"] {
        if url.len() >= scheme.len()
            && url.is_char_boundary(scheme.len())
            && url[..scheme.len()].eq_ignore_ascii_case(scheme)
        {
            return format!("{scheme}{}", &url[scheme.len()..]);
        }
    }
    url.to_owned()
}

/// Whether a broker address (any of a list) is plain `ws://` to another machine: the traffic's
/// metadata (who talks to whom, when, how much) open to anyone on the path. Loopback (`localhost`,
/// 127.0.0.0/8, `::1`) never leaves this machine.
pub fn unencrypted(list: &str) -> bool {
    addresses(list).any(unencrypted_address)
}

fn unencrypted_address(url: &str) -> bool {
    if !url.starts_with("ws://") {
        return false;
    }
    let Ok(uri) = url.parse::<tokio_tungstenite::tungstenite::http::Uri>() else {
        return true;
    };
    let host = uri.host().unwrap_or_default().trim_start_matches('[').trim_end_matches(']');
    let host = host.trim_end_matches('.');
    let loopback =
        host.eq_ignore_ascii_case("localhost") || host.parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_loopback());
    !loopback
}

/// Who connects, to which mesh, with what claims.
#[derive(Clone)]
pub struct LinkSpec {
    pub mesh_id: MeshId,
    pub mesh_name: String,
    pub broker_url: String,
    pub identity: Identity,
    /// The display name it says hello with; a rename changes it for the next connection too.
    pub name: Arc<std::sync::Mutex<String>>,
    /// For a session: the member's attestation, re-minted on every connect.
    pub attest: Option<Arc<dyn Fn() -> Signed + Send + Sync>>,
}

impl LinkSpec {
    pub fn name(&self) -> String {
        self.name.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Only the member's link keeps the daemon's copy of the roster: every link of a mesh sees the same
    /// roster, and a session's link going down says nothing about who else is online.
    fn keeps_roster(&self) -> bool {
        self.attest.is_none()
    }
}

impl std::fmt::Debug for LinkSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkSpec")
            .field("mesh", &self.mesh_name)
            .field("broker", &self.broker_url)
            .field("key", &self.identity.key())
            .field("session", &self.attest.is_some())
            .finish()
    }
}

/// Connects, answers the challenge and returns the socket with the broker's `welcome`.
pub async fn handshake(
    broker: Broker<'_>,
    identity: &Identity,
    name: &str,
    mesh_id: MeshId,
    attestation: Option<Signed>,
    intent: impl FnOnce(&[u8]) -> Intent,
) -> Result<(Ws, Welcome), LinkError> {
    handshake_via(broker, identity, name, mesh_id, attestation, intent)
        .await
        .map(|(ws, welcome, _)| (ws, welcome))
        .map_err(|(e, _)| e)
}

/// [`handshake`], also saying which of the broker's addresses answered (or refused).
async fn handshake_via(
    broker: Broker<'_>,
    identity: &Identity,
    name: &str,
    mesh_id: MeshId,
    attestation: Option<Signed>,
    intent: impl FnOnce(&[u8]) -> Intent,
) -> Result<(Ws, Welcome, String), (LinkError, Option<String>)> {
    let (ws, _, address) = connect(broker).await.map_err(|e| (e, None))?;
    greet(ws, broker, identity, name, mesh_id, attestation, intent)
        .await
        .map_err(|e| (e, Some(address.clone())))
        .map(|(ws, welcome)| (ws, welcome, address))
}

/// The handshake on a connected socket: the challenge answered, the `welcome` read.
async fn greet(
    mut ws: Ws,
    broker: Broker<'_>,
    identity: &Identity,
    name: &str,
    mesh_id: MeshId,
    attestation: Option<Signed>,
    intent: impl FnOnce(&[u8]) -> Intent,
) -> Result<(Ws, Welcome), LinkError> {
    let challenge = match next_frame(&mut ws).await? {
        ServerFrame::Challenge(c) if c.v == mesh_proto::PROTOCOL_VERSION => c.nonce,
        ServerFrame::Challenge(c) => return Err(LinkError::Protocol(format!("broker speaks protocol v{}", c.v))),
        ServerFrame::Error(e) => return Err(LinkError::Refused(e)),
        other => return Err(LinkError::Protocol(format!("expected a challenge, got {other:?}"))),
    };
    let public = identity.public();
    let claims = HelloClaims {
        v: mesh_proto::PROTOCOL_VERSION,
        challenge: codec::b64(&challenge),
        mesh_id,
        key: public.key,
        enc_key: public.enc_key,
        enc_sig: public.enc_sig,
        name: name.to_owned(),
        client: concat!("mesh/", env!("CARGO_PKG_VERSION")).to_owned(),
        at: now_ms(),
        intent: intent(&challenge),
        attestation,
    };
    let hello = ClientFrame::Hello(Hello { v: mesh_proto::PROTOCOL_VERSION, auth: Signed::sign(identity, &claims) });
    ws.send(Message::Text(hello.to_json().into()))
        .await
        .map_err(|e| LinkError::Unreachable { url: broker.url.to_owned(), detail: e.to_string() })?;
    match next_frame(&mut ws).await? {
        ServerFrame::Welcome(w) => Ok((ws, w)),
        ServerFrame::Error(e) => Err(LinkError::Refused(e)),
        other => Err(LinkError::Protocol(format!("expected welcome, got {other:?}"))),
    }
}

/// The certificate a `wss://` broker presents now, and whether it passes the platform's verification
/// (when not, why).
pub async fn presented_certificate(url: &str, mesh: &str) -> Result<(CertPin, Result<(), CertError>), LinkError> {
    match connect(Broker { url, pin: None, mesh }).await {
        Ok((_, Some(pin), _)) => Ok((pin, Ok(()))),
        Ok((_, None, _)) => Err(LinkError::Protocol(format!("{url} is not a TLS address"))),
        Err(LinkError::Certificate(refused)) => match refused.presented() {
            Some(pin) => Ok((pin, Err(refused))),
            None => Err(LinkError::Certificate(refused)),
        },
        Err(e) => Err(e),
    }
}

/// Whether a `wss://` broker passes the check `pin` asks for (the platform's authorities without one):
/// `Ok(Err(why))` when its certificate is refused.
pub async fn check_certificate(
    url: &str,
    pin: Option<CertPin>,
    mesh: &str,
) -> Result<Result<(), CertError>, LinkError> {
    match connect(Broker { url, pin, mesh }).await {
        Ok(_) => Ok(Ok(())),
        Err(LinkError::Certificate(refused)) => Ok(Err(refused)),
        Err(e) => Err(e),
    }
}

/// Opens the WebSocket, over TLS for `wss://` with the broker's certificate checked as `broker` says;
/// with the certificate the broker presented.
/// Connects to the first of the broker's addresses that answers. A certificate refused is final:
/// never a fallback to another address for it.
async fn connect(broker: Broker<'_>) -> Result<(Ws, Option<CertPin>, String), LinkError> {
    let mut failed = Vec::new();
    for url in addresses(broker.url) {
        match connect_to(Broker { url, ..broker }).await {
            Ok((ws, pin)) => {
                tracing::debug!(broker = url, "connected");
                return Ok((ws, pin, url.to_owned()));
            }
            Err(e @ LinkError::Unreachable { .. }) => {
                tracing::debug!(error = %e, "broker address unreachable; trying the next");
                failed.push(e);
            }
            Err(e) => return Err(e),
        }
    }
    // One address: its own error. Several: each address with why it did not answer.
    match failed.len() {
        0 => Err(LinkError::Unreachable { url: broker.url.to_owned(), detail: "no address".into() }),
        1 => Err(failed.remove(0)),
        n => {
            let each: Vec<String> = failed
                .iter()
                .map(|e| match e {
                    LinkError::Unreachable { url, detail } => format!("{url}: {detail}"),
                    other => other.to_string(),
                })
                .collect();
            Err(LinkError::Unreachable {
                url: broker.url.to_owned(),
                detail: format!("none of its {n} addresses answered ({})", each.join("; ")),
            })
        }
    }
}

async fn connect_to(broker: Broker<'_>) -> Result<(Ws, Option<CertPin>), LinkError> {
    use tokio_tungstenite::Connector;
    use tokio_tungstenite::tungstenite::Error as WsError;
    let url = broker.url;
    let unreachable = |detail: String| LinkError::Unreachable { url: url.to_owned(), detail };
    let endpoint = ws_endpoint(url).map_err(unreachable)?;
    let verifier = endpoint.starts_with("wss://").then(|| crate::tls::Verifier::new(Trust::from_pin(broker.pin)));
    let connector = match &verifier {
        Some(v) => Connector::Rustls(v.client_config().map_err(unreachable)?),
        None => Connector::Plain,
    };
    // No Nagle: a small frame right after another must not wait for the broker's delayed ACK.
    let connecting = tokio_tungstenite::connect_async_tls_with_config(&endpoint, None, true, Some(connector));
    match tokio::time::timeout(CONNECT_TIMEOUT, connecting).await {
        Err(_) => Err(unreachable("timed out".into())),
        Ok(Ok((ws, _))) => Ok((ws, verifier.and_then(|v| v.presented()))),
        Ok(Err(WsError::Io(e))) => {
            let tls = e.get_ref().and_then(|inner| inner.downcast_ref::<rustls::Error>());
            if let (Some(verifier), Some(tls)) = (&verifier, tls) {
                let host = endpoint.parse::<tokio_tungstenite::tungstenite::http::Uri>().ok();
                let host = host.as_ref().and_then(|u| u.host()).unwrap_or_default();
                if let Some(refused) = verifier.explain(tls, host, broker.mesh) {
                    return Err(LinkError::Certificate(refused));
                }
                if matches!(tls, rustls::Error::InvalidMessage(_)) {
                    return Err(unreachable(format!("{e} (does it speak TLS? a plain broker is ws://)")));
                }
            }
            Err(unreachable(e.to_string()))
        }
        Ok(Err(e @ WsError::Protocol(tokio_tungstenite::tungstenite::error::ProtocolError::HttparseError(_))))
            if verifier.is_none() =>
        {
            Err(unreachable(format!("{e} (does it speak TLS? then its address is wss://)")))
        }
        Ok(Err(e)) => Err(unreachable(e.to_string())),
    }
}

async fn next_frame(ws: &mut Ws) -> Result<ServerFrame, LinkError> {
    loop {
        let msg = tokio::time::timeout(CONNECT_TIMEOUT, ws.next())
            .await
            .map_err(|_| LinkError::Protocol("no answer during the handshake".into()))?;
        match msg {
            Some(Ok(Message::Text(t))) => {
                return wire::decode_server(&t).map_err(|e| LinkError::Protocol(e.detail));
            }
            Some(Ok(Message::Close(frame))) => {
                return Err(LinkError::Protocol(format!(
                    "closed during the handshake{}",
                    frame.map(|f| format!(": {}", f.reason)).unwrap_or_default()
                )));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(LinkError::Protocol(e.to_string())),
            None => return Err(LinkError::Protocol("connection closed during the handshake".into())),
        }
    }
}

/// The handle the daemon keeps for a running link.
#[derive(Clone, Debug)]
pub struct LinkHandle {
    pub status: watch::Receiver<LinkStatus>,
    pub drain_wake: Arc<Notify>,
    pub cancel: CancellationToken,
    /// Requests made for users (a rename), sent on the link's current connection.
    pub requests: mpsc::Sender<LinkRequest>,
    pub name: Arc<std::sync::Mutex<String>>,
    /// The limits the broker announced in the last `welcome` (the mesh's, within the broker's).
    pub limits: Arc<std::sync::Mutex<Option<Limits>>>,
    /// Ends a wait before the next attempt (a pin was just corrected, say).
    pub retry: Arc<Notify>,
    /// The mesh key's epoch as the broker last said (welcome, `key_state`), and whether a new key
    /// is wanted.
    pub key_state: Arc<std::sync::Mutex<Option<wire::KeyState>>>,
}

impl LinkHandle {
    /// Sends `frame` on this link's connection and waits for the broker's answer.
    pub async fn request(
        &self,
        frame: impl FnOnce(u64) -> ClientFrame + Send + 'static,
        timeout: Duration,
    ) -> Result<drain::Answer, RequestError> {
        let (reply, answer) = tokio::sync::oneshot::channel();
        let request = LinkRequest { frame: Box::new(frame), reply };
        tokio::time::timeout(timeout, async {
            self.requests.send(request).await.map_err(|_| RequestError::NotConnected)?;
            match answer.await {
                Ok(Ok(answered)) => Ok(answered),
                Ok(Err(e)) => Err(RequestError::Refused(e)),
                Err(_) => Err(RequestError::NotConnected),
            }
        })
        .await
        .map_err(|_| RequestError::NotConnected)?
    }
}

/// Why a request over a link did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum RequestError {
    #[error("the connection to the broker is down, or was lost before it answered")]
    NotConnected,
    #[error("the broker refused: {}: {}", .0.code.as_str(), .0.message)]
    Refused(ErrorFrame),
}

/// Starts the state machine of one link as a tracked task.
pub fn spawn(daemon: &Arc<Daemon>, spec: LinkSpec) -> LinkHandle {
    let (status_tx, status_rx) = watch::channel(LinkStatus {
        state: LinkState::Connecting,
        since: now_ms(),
        last_error: None,
        clock_skew_ms: None,
        certificate: None,
        address: None,
    });
    // One request at a time is plenty: they are rare, and each waits for its answer.
    let (requests, requests_rx) = mpsc::channel(4);
    let handle = LinkHandle {
        status: status_rx,
        drain_wake: Arc::new(Notify::new()),
        cancel: daemon.shutdown.child_token(),
        requests,
        name: spec.name.clone(),
        limits: Arc::default(),
        retry: Arc::new(Notify::new()),
        key_state: Arc::default(),
    };
    let requests_rx = Arc::new(tokio::sync::Mutex::new(requests_rx));
    let span = tracing::info_span!("link", mesh = %spec.mesh_name, key = %spec.identity.key().short());
    daemon.tracker.spawn(run(daemon.clone(), spec, status_tx, handle.clone(), requests_rx).instrument(span));
    handle
}

fn set_state(tx: &watch::Sender<LinkStatus>, state: LinkState, last_error: Option<String>) {
    tx.send_modify(|s| {
        // A refused link trying again is still refused until that attempt says otherwise: "rejected
        // since" keeps counting from the first refusal.
        if s.state == LinkState::Rejected && state == LinkState::Connecting {
            return;
        }
        if s.state != state {
            s.since = now_ms();
        }
        s.state = state;
        if last_error.is_some() || state == LinkState::Online {
            s.last_error = last_error;
        }
        // The address is the one connected to: said only while online.
        if state != LinkState::Online {
            s.address = None;
        }
        if state != LinkState::Rejected {
            s.certificate = None;
        }
    });
}

/// Records a change of the link's settled state (online, offline, rejected) as a `connection` event
/// for the link's identity; repeated failures while offline are not news.
async fn record_state(
    daemon: &Daemon,
    spec: &LinkSpec,
    last: &mut Option<LinkState>,
    state: LinkState,
    error: Option<String>,
) {
    if *last == Some(state) {
        return;
    }
    *last = Some(state);
    let (mesh, key) = (spec.mesh_id, spec.identity.key());
    let event = EventBody::Connection(ConnectionEvent { key: key.to_string(), state, last_error: error });
    match daemon.db.call(move |c| events::append(c, Some(&mesh), Some(&key), &event, now_ms())).await {
        Ok(_) => daemon.notify_changed(),
        Err(e) => tracing::error!(error = %mesh_proto::error::chain(&e), "recording a connection event"),
    }
}

async fn run(
    daemon: Arc<Daemon>,
    spec: LinkSpec,
    status: watch::Sender<LinkStatus>,
    handle: LinkHandle,
    requests: Arc<tokio::sync::Mutex<mpsc::Receiver<LinkRequest>>>,
) {
    let mut failures: u32 = 0;
    let mut recorded: Option<LinkState> = None;
    // With several addresses, each attempt starts from the one after the last tried: a replica that
    // dropped the connection or failed to answer is tried last.
    let mut first = 0;
    let address_count = addresses(&spec.broker_url).count().max(1);
    let mut refusals = Refusals::default();
    loop {
        set_state(&status, LinkState::Connecting, None);
        let attestation = spec.attest.as_ref().map(|mint| mint());
        let name = spec.name();
        let order = rotated(&spec.broker_url, first);
        first += 1;
        let broker = Broker { url: &order, pin: daemon.tls_pin(&spec.mesh_id), mesh: &spec.mesh_name };
        let connected = tokio::select! {
            r = handshake_via(broker, &spec.identity, &name, spec.mesh_id, attestation, |_| Intent::Connect) => r,
            () = handle.cancel.cancelled() => return,
        };
        let every_address_refused = match &connected {
            Err((LinkError::Refused(e), address)) if e.permanent => refusals.refused(address.as_deref(), address_count),
            _ => false,
        };
        let wait = match connected {
            Ok((ws, welcome, address)) => {
                failures = 0;
                refusals.online();
                let skew = welcome.server_time as i64 - now_ms() as i64;
                status.send_modify(|s| {
                    s.clock_skew_ms = Some(skew);
                    s.address = Some(address);
                });
                tracing::info!(peers = welcome.roster.len(), skew_ms = skew, "online");
                *handle.limits.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(welcome.limits.clone());
                if spec.keeps_roster() {
                    crate::rekey::heard(&daemon, spec.mesh_id, &handle.key_state, welcome.key);
                }
                let mesh = spec.mesh_id;
                let stored = if spec.keeps_roster() && welcome.roster_next.is_none() {
                    let roster_peers = welcome.roster.clone();
                    daemon.db.call(move |c| roster::replace(c, &mesh, &roster_peers)).await
                } else if spec.keeps_roster() {
                    // More pages follow: the reader fetches them and replaces the roster once whole.
                    Ok(())
                } else {
                    // A session of ours is in the roster as soon as the broker has it, whatever the
                    // order in which the member's link hears of it.
                    let you = welcome.you.clone();
                    daemon.db.call(move |c| roster::upsert(c, &mesh, &you)).await
                };
                if let Err(e) = stored {
                    tracing::error!(error = %mesh_proto::error::chain(&e), "storing the roster");
                }
                if spec.keeps_roster() {
                    // The member's role as the broker has it now (it may have changed while away).
                    let role = welcome.you.role;
                    let updated = daemon
                        .db
                        .call(move |c| {
                            c.execute(
                                "UPDATE meshes SET role = ?2 WHERE id = ?1 AND role != ?2",
                                rusqlite::params![mesh.to_string(), role.as_str()],
                            )
                        })
                        .await;
                    if let Err(e) = updated {
                        tracing::error!(error = %mesh_proto::error::chain(&e), "storing the member's role");
                    }
                }
                set_state(&status, LinkState::Online, None);
                record_state(&daemon, &spec, &mut recorded, LinkState::Online, None).await;
                let ended = online(&daemon, &spec, ws, &welcome, &handle, &requests).await;
                if spec.keeps_roster() {
                    let mesh = spec.mesh_id;
                    let _ = daemon.db.call(move |c| roster::mark_all_offline(c, &mesh)).await;
                }
                if handle.cancel.is_cancelled() {
                    return;
                }
                tracing::info!(reason = %ended.reason, "offline");
                let state = if ended.permanent { LinkState::Rejected } else { LinkState::Offline };
                set_state(&status, state, Some(ended.reason.clone()));
                record_state(&daemon, &spec, &mut recorded, state, Some(ended.reason)).await;
                if ended.permanent { REJECTED_RETRY } else { reconnect_delay(0) }
            }
            Err((LinkError::Refused(e), _)) if e.permanent && !every_address_refused => {
                tracing::warn!(code = e.code.as_str(), detail = %e.message, "one of the broker's addresses refused this identity; trying the next");
                let why = format!("{}: {} (trying the next address)", e.code.as_str(), e.message);
                set_state(&status, LinkState::Offline, Some(why.clone()));
                record_state(&daemon, &spec, &mut recorded, LinkState::Offline, Some(why)).await;
                // With backoff: the other addresses may all be down, and this one would be asked
                // again and again.
                failures = failures.saturating_add(1);
                reconnect_delay(failures)
            }
            Err((LinkError::Refused(e), _)) if e.permanent => {
                tracing::warn!(code = e.code.as_str(), detail = %e.message, "broker refused this identity");
                let why = format!("{}: {}", e.code.as_str(), e.message);
                status.send_modify(|s| s.certificate = None);
                set_state(&status, LinkState::Rejected, Some(why.clone()));
                record_state(&daemon, &spec, &mut recorded, LinkState::Rejected, Some(why)).await;
                REJECTED_RETRY
            }
            Err((LinkError::Certificate(e), _)) => {
                // Never a silent fallback: the link stays down, saying why, until the certificate or
                // the pin is put right.
                tracing::warn!(error = %e, "broker certificate refused");
                status.send_modify(|s| s.certificate = e.presented().map(|p| p.to_string()));
                set_state(&status, LinkState::Rejected, Some(e.to_string()));
                record_state(&daemon, &spec, &mut recorded, LinkState::Rejected, Some(e.to_string())).await;
                REJECTED_RETRY
            }
            Err((e, _)) => {
                failures = failures.saturating_add(1);
                tracing::info!(error = %mesh_proto::error::chain(&e), failures, "cannot connect");
                set_state(&status, LinkState::Offline, Some(e.to_string()));
                record_state(&daemon, &spec, &mut recorded, LinkState::Offline, Some(e.to_string())).await;
                reconnect_delay(failures)
            }
        };
        tokio::select! {
            () = tokio::time::sleep(wait) => {}
            () = handle.retry.notified() => {}
            () = handle.cancel.cancelled() => return,
        }
    }
}

/// Permanent refusals since the link was last online, by address: with several addresses, one
/// replica refusing (misconfigured, on another database) is not the mesh refusing until every address
/// has said so. An address that does not answer refuses nothing.
#[derive(Default)]
struct Refusals {
    by: std::collections::HashSet<String>,
}

impl Refusals {
    /// Records a refusal by `address`: whether every one of `count` addresses has now refused (then
    /// they are forgotten, and the next round asks each again).
    fn refused(&mut self, address: Option<&str>, count: usize) -> bool {
        self.by.insert(address.unwrap_or_default().to_owned());
        let every = self.by.len() >= count;
        if every {
            self.by.clear();
        }
        every
    }

    fn online(&mut self) {
        self.by.clear();
    }
}

/// Why a connection broke, in words: a TLS connection cut without its closing message (the broker
/// killed, a proxy dropping it) is said as such, not as rustls's advice to programmers.
fn lost(e: &tokio_tungstenite::tungstenite::Error) -> String {
    match e {
        tokio_tungstenite::tungstenite::Error::Io(io) if io.kind() == std::io::ErrorKind::UnexpectedEof => {
            "the broker's end closed without a goodbye (it stopped, or the network dropped the connection)".into()
        }
        other => other.to_string(),
    }
}

/// 0.5 s · 2^failures, capped at 30 s, with jitter.
fn reconnect_delay(failures: u32) -> Duration {
    let exp = RECONNECT_MIN_MS.saturating_mul(1u64 << failures.min(16)).min(RECONNECT_MAX_MS);
    Duration::from_millis(rand::thread_rng().gen_range(exp / 2..=exp))
}

struct Ended {
    reason: String,
    permanent: bool,
}

impl Ended {
    fn transient(reason: impl Into<String>) -> Ended {
        Ended { reason: reason.into(), permanent: false }
    }
}

/// Runs an authenticated connection until it ends; the drain's inflight rows go back to pending.
async fn online(
    daemon: &Arc<Daemon>,
    spec: &LinkSpec,
    ws: Ws,
    welcome: &Welcome,
    handle: &LinkHandle,
    requests: &Arc<tokio::sync::Mutex<mpsc::Receiver<LinkRequest>>>,
) -> Ended {
    let (mut sink, mut stream) = ws.split();
    let (out_tx, mut out_rx) = mpsc::channel::<String>(512);
    let (reply_tx, reply_rx) = mpsc::unbounded_channel::<Reply>();
    let stop = handle.cancel.child_token();

    let writer = daemon.tracker.spawn(
        async move {
            let mut ping = tokio::time::interval_at(tokio::time::Instant::now() + PING_EVERY, PING_EVERY);
            loop {
                let msg = tokio::select! {
                    text = out_rx.recv() => match text {
                        Some(t) => Message::Text(t.into()),
                        None => break,
                    },
                    _ = ping.tick() => Message::Ping(Default::default()),
                };
                if sink.send(msg).await.is_err() {
                    break;
                }
            }
            let _ = sink.close().await;
        }
        .in_current_span(),
    );
    let drain = daemon.tracker.spawn(
        drain::Drain {
            db: daemon.db.clone(),
            changed: daemon.changed.clone(),
            mesh: spec.mesh_id,
            sender: spec.identity.key(),
            max_frame_bytes: usize::try_from(welcome.limits.max_frame_bytes).unwrap_or(usize::MAX),
            member_link: spec.keeps_roster(),
            identity: spec.identity.clone(),
        }
        .run(drain::Channels {
            out: out_tx.clone(),
            replies: reply_rx,
            wake: handle.drain_wake.clone(),
            stop: stop.clone(),
            requests: requests.clone(),
        })
        .in_current_span(),
    );

    // A roster longer than one page is fetched page by page and stored once whole.
    let mut paging = None;
    if spec.keeps_roster()
        && let Some(after) = welcome.roster_next
    {
        paging = Some(welcome.roster.clone());
        let _ = out_tx.send(roster_request(after)).await;
    }
    let ended = read_loop(daemon, spec, &mut stream, &out_tx, &reply_tx, &stop, paging, &handle.key_state).await;
    stop.cancel();
    let _ = drain.await;
    drop(out_tx);
    // A broker that stopped reading can hold the writer in a socket write: give it a moment, then drop it.
    let abort = writer.abort_handle();
    if tokio::time::timeout(WRITER_GRACE, writer).await.is_err() {
        abort.abort();
    }
    ended
}

/// Request ids the reader uses for roster pages, far from the drain's (which count up from 1).
const ROSTER_REQUEST_ID: u64 = u64::MAX;

fn roster_request(after: mesh_proto::PublicKey) -> String {
    ClientFrame::Roster(wire::RosterRequest { id: ROSTER_REQUEST_ID, after: Some(after) }).to_json()
}

// The reader's inputs, each borrowed from the connection it reads for.
#[allow(clippy::too_many_arguments)]
async fn read_loop(
    daemon: &Arc<Daemon>,
    spec: &LinkSpec,
    stream: &mut futures_util::stream::SplitStream<Ws>,
    out: &mpsc::Sender<String>,
    replies: &mpsc::UnboundedSender<Reply>,
    stop: &CancellationToken,
    mut paging: Option<Vec<wire::Peer>>,
    key_state: &Arc<std::sync::Mutex<Option<wire::KeyState>>>,
) -> Ended {
    loop {
        let first = tokio::select! {
            next = tokio::time::timeout(STALE_AFTER, stream.next()) => next,
            () = stop.cancelled() => return Ended::transient("stopping"),
        };
        let first = match first {
            Err(_) => return Ended::transient(format!("no answer from the broker for {} s", STALE_AFTER.as_secs())),
            Ok(None) => return Ended::transient("the broker closed the connection"),
            Ok(Some(Err(e))) => return Ended::transient(format!("connection lost: {}", lost(&e))),
            Ok(Some(Ok(m))) => m,
        };
        // Take whatever else is already here, so deliveries are committed and acked in batches.
        let mut batch = vec![first];
        while batch.len() < INTAKE_BATCH {
            match stream.next().now_or_never() {
                Some(Some(Ok(m))) => batch.push(m),
                _ => break,
            }
        }
        let mut deliveries = Vec::new();
        for msg in batch {
            let text = match msg {
                Message::Text(t) => t,
                Message::Close(frame) => {
                    return Ended::transient(format!(
                        "the broker closed the connection{}",
                        frame.map(|f| format!(": {}", f.reason)).unwrap_or_default()
                    ));
                }
                _ => continue,
            };
            match wire::decode_server(&text) {
                Ok(ServerFrame::Deliver(d)) => deliveries.push((d.delivery_id, Ok(d.item), text.to_string())),
                Ok(ServerFrame::Ok(ok)) => {
                    let _ = replies.send(Reply::Ok(ok.id));
                }
                Ok(ServerFrame::Accepted(a)) => {
                    let _ = replies.send(Reply::Accepted(a));
                }
                Ok(ServerFrame::Invites(i)) => {
                    let _ = replies.send(Reply::Invites(i));
                }
                Ok(ServerFrame::KeyState(k)) if spec.keeps_roster() => {
                    crate::rekey::heard(daemon, spec.mesh_id, key_state, k);
                }
                Ok(ServerFrame::KeyState(_)) => {}
                Ok(ServerFrame::Error(e)) if e.id.is_some() => {
                    let _ = replies.send(Reply::Error(e));
                }
                Ok(ServerFrame::Error(e)) => {
                    tracing::warn!(code = e.code.as_str(), detail = %e.message, "broker error");
                    if matches!(e.code, ErrorCode::Superseded | ErrorCode::Revoked | ErrorCode::UnknownMesh) {
                        return Ended { reason: format!("{}: {}", e.code.as_str(), e.message), permanent: true };
                    }
                }
                Ok(ServerFrame::Presence(_) | ServerFrame::Roster(_)) if !spec.keeps_roster() => {}
                Ok(ServerFrame::Presence(p)) => {
                    let mesh = spec.mesh_id;
                    let recorded = daemon
                        .db
                        .call(move |c| {
                            if p.removed {
                                roster::remove(c, &mesh, &p.peer.key)?;
                            } else {
                                roster::upsert(c, &mesh, &p.peer)?;
                            }
                            let event = EventBody::Presence(PresenceEvent {
                                key: p.peer.key.to_string(),
                                name: p.peer.name.clone(),
                                kind: p.peer.kind,
                                online: p.peer.online,
                                ended_at: p.peer.ended_at,
                                removed: p.removed,
                            });
                            events::append(c, Some(&mesh), None, &event, now_ms())
                        })
                        .await;
                    match recorded {
                        Ok(_) => daemon.notify_changed(),
                        Err(e) => tracing::error!(error = %mesh_proto::error::chain(&e), "recording presence"),
                    }
                }
                Ok(ServerFrame::Roster(r)) => {
                    let mut peers = paging.take().unwrap_or_default();
                    peers.extend(r.peers);
                    if let Some(after) = r.next {
                        paging = Some(peers);
                        if out.send(roster_request(after)).await.is_err() {
                            return Ended::transient("writer stopped");
                        }
                        continue;
                    }
                    let mesh = spec.mesh_id;
                    if let Err(e) = daemon.db.call(move |c| roster::replace(c, &mesh, &peers)).await {
                        tracing::error!(error = %mesh_proto::error::chain(&e), "storing the roster");
                    }
                }
                Ok(other) => tracing::warn!(frame = ?other, "unexpected frame from the broker; ignored"),
                Err(e) => {
                    // A deliver we cannot parse is still kept (as failed) and acked, never dropped.
                    match raw_delivery_id(&text) {
                        Some(id) => deliveries.push((id, Err(e.detail), text.to_string())),
                        None => tracing::warn!(detail = %e.detail, "undecodable frame from the broker; ignored"),
                    }
                }
            }
        }
        if !deliveries.is_empty() {
            match intake(daemon, spec, deliveries).await {
                Ok(ids) => {
                    daemon.inbox_wake.notify_one();
                    daemon.notify_changed();
                    let ack = ClientFrame::Ack(Ack { delivery_ids: ids }).to_json();
                    if let Some(delay) = daemon.inject_ack_delay.get().copied() {
                        let out = out.clone();
                        daemon.tracker.spawn(async move {
                            tokio::time::sleep(delay).await;
                            let _ = out.send(ack).await;
                        });
                        continue;
                    }
                    match tokio::time::timeout(STALE_AFTER, out.send(ack)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => return Ended::transient("writer stopped"),
                        Err(_) => {
                            return Ended::transient(format!(
                                "the broker stopped reading for {} s",
                                STALE_AFTER.as_secs()
                            ));
                        }
                    }
                }
                // Not acked: the broker will deliver these again after its lease.
                Err(e) => {
                    tracing::error!(error = %mesh_proto::error::chain(&e), "committing deliveries; they will be redelivered")
                }
            }
        }
    }
}

fn raw_delivery_id(text: &str) -> Option<u64> {
    let v: serde_json::Value = serde_json::from_str(text).ok()?;
    (v.get("type")?.as_str()? == "deliver").then_some(())?;
    v.get("delivery_id")?.as_u64()
}

type Delivery = (u64, Result<DeliveryItem, String>, String);

/// Commits a batch of deliveries in one transaction and returns their ids to ack.
async fn intake(
    daemon: &Arc<Daemon>,
    spec: &LinkSpec,
    deliveries: Vec<Delivery>,
) -> Result<Vec<u64>, mesh_broker::sqlite::DbError> {
    let recipient = spec.identity.key();
    let mesh = spec.mesh_id;
    let member = daemon.member.identity.key();
    let identity = spec.identity.clone();
    daemon
        .db
        .call(move |c| {
            let now = now_ms();
            let tx = c.transaction()?;
            let mut ids = Vec::with_capacity(deliveries.len());
            for (id, item, raw) in deliveries {
                match item {
                    Ok(DeliveryItem::Message(env)) => {
                        inbox::accept(&tx, &recipient, &env, &raw, now)?;
                    }
                    Ok(DeliveryItem::Receipt(r)) => outbox::apply_receipt(&tx, &r, now)?,
                    Ok(DeliveryItem::Receipts(batch)) => {
                        for r in &batch.receipts {
                            outbox::apply_receipt(&tx, r, now)?;
                        }
                    }
                    Ok(DeliveryItem::Membership(notice)) => {
                        crate::membership::apply(&tx, &mesh, &member, &notice, now)?;
                    }
                    Ok(DeliveryItem::MeshKey(item)) => {
                        crate::keys::apply_grant(&tx, &mesh, &identity, &item, now)?;
                    }
                    Err(detail) => inbox::accept_unparsable(&tx, &mesh, &recipient, id, &raw, &detail, now)?,
                }
                ids.push(id);
            }
            tx.commit()?;
            Ok(ids)
        })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn when_no_address_answers_each_is_named_with_its_reason() {
        let closed = || std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let list = format!("ws://127.0.0.1:{},ws://127.0.0.1:{}", closed(), closed());
        let Err(e) = connect(Broker { url: &list, pin: None, mesh: "team" }).await else { panic!("nothing listens") };
        let said = e.to_string();
        assert!(said.contains("none of its 2 addresses answered"), "{said}");
        for address in list.split(',') {
            assert!(said.contains(&format!("{address}: ")), "{address} is named: {said}");
        }
    }

    #[test]
    fn the_link_is_rejected_only_when_every_address_has_refused() {
        let (a, b) = (Some("ws://a:1"), Some("ws://b:1"));
        let mut r = Refusals::default();
        // A refuses; B does not answer (no refusal); A refuses again: B may still take the member.
        assert!(!r.refused(a, 2));
        assert!(!r.refused(a, 2), "a second refusal by the same address is not every address");
        // B refuses too: every address has.
        assert!(r.refused(b, 2));
        // Forgotten then, and when online.
        assert!(!r.refused(b, 2));
        r.online();
        assert!(!r.refused(a, 2));
        assert!(Refusals::default().refused(a, 1), "one address: its refusal is the mesh's");
    }

    #[test]
    fn plain_ws_is_unencrypted_unless_it_stays_on_this_machine() {
        for local in
            ["ws://127.0.0.1:7777", "ws://127.9.9.9:1", "ws://localhost:1", "ws://LOCALHOST.:1", "ws://[::1]:7777"]
        {
            assert!(!unencrypted(local), "{local}");
        }
        for remote in ["ws://10.0.0.1:7777", "ws://broker.example:7777", "ws://[::ffff:10.0.0.1]:1", "ws://0.0.0.0:1"] {
            assert!(unencrypted(remote), "{remote}");
        }
        assert!(!unencrypted("wss://broker.example:7777"));
    }

    #[test]
    fn endpoints() {
        assert_eq!(ws_endpoint("ws://127.0.0.1:7000").expect("ok"), "ws://127.0.0.1:7000/v1/ws");
        assert_eq!(ws_endpoint("ws://h:1/").expect("ok"), "ws://h:1/v1/ws");
        assert_eq!(ws_endpoint("ws://h/custom/ws").expect("ok"), "ws://h/custom/ws");
        assert_eq!(ws_endpoint("wss://h").expect("ok"), "wss://h/v1/ws");
        assert!(ws_endpoint("wss://").is_err());
        assert!(ws_endpoint("wss://:7777").is_err());
        assert!(ws_endpoint("wss://admin:s3cret@h:7777").expect_err("credentials").contains("no user name"));
        for bad_port in [
            "wss://h:99999",
            "wss://h:0",
            "ws://h:-1",
            "ws://h:x",
            "wss://h:+7777",
            "wss://h:07777",
            "wss://h:1?x=1",
            "wss://h:1#f",
            "wss://127.1:7777",
        ] {
            assert!(ws_endpoint(bad_port).is_err(), "{bad_port}");
        }
        assert!(ws_endpoint("wss://[::1]:7777").is_ok());
        assert_eq!(normalize_scheme("WSS://h:1"), "wss://h:1");
        assert_eq!(address_list(" WSS://a:1 , wss://b:2,").expect("a list"), "wss://a:1,wss://b:2");
        assert!(address_list("wss://a:1,ws://b:2").expect_err("mixed").contains("mix"));
        assert!(address_list("wss://a:1,wss://a:1").expect_err("twice").contains("twice"));
        assert!(address_list("ws://a:1,ws://a:1/").expect_err("twice").contains("twice"));
        assert!(!address_list("wss://u:s3cret@a:1").expect_err("credentials").contains("s3cret"));
        assert!(!address_list("wss://u:s3cret@a:99999").expect_err("credentials").contains("s3cret"));
        assert!(address_list("wss://a:1,wss://u:p@b:2").is_err(), "each address is checked");
        assert!(address_list(" , ").is_err());
        assert!(address_list(&vec!["wss://a:1"; MAX_ADDRESSES + 1].join(",")).is_err());
        assert_eq!(rotated("ws://a:1,ws://b:2,ws://c:3", 4), "ws://b:2,ws://c:3,ws://a:1");
        assert!(unencrypted("ws://127.0.0.1:1,ws://broker.example:2"), "any address off this machine");
        assert_eq!(normalize_scheme("Ws://h:1"), "ws://h:1");
        assert_eq!(normalize_scheme("http://h"), "http://h");
        assert!(ws_endpoint("http://h").is_err());
        assert!(ws_endpoint("ws://").is_err());
    }
}
