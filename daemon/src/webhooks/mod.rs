//! Webhooks: events POSTed to the user's endpoints, durably (docs/webhooks.md).
//!
//! An endpoint belongs to an identity (the member or a session) and receives that identity's events
//! only, exactly as its event stream would: [`enqueue`] runs inside `events::append`, so a delivery
//! row is committed in the same transaction as the change it reports, and posting is left to the
//! [`worker`]. A delivery is `pending → delivered`, or `pending → dead` past its deadline or after a
//! permanent refusal; `redeliver` makes it pending again. A pending row being attempted carries a
//! lease; a lease that runs out (its worker died) makes the row claimable again.

pub mod sign;
pub mod worker;

use std::time::Duration;

use mesh_ipc::api::{
    DeliveriesQuery, DeliveryFilter, DeliveryInfo, DeliveryStatus, DisabledWebhook, EventBody, WebhookDeliveryCounts,
    WebhookEvent, WebhookInfo, WebhookStatus,
};
use mesh_proto::{MeshId, PublicKey};
use rand::Rng;
use rusqlite::{Connection, OptionalExtension, Row, params};
use serde::Deserialize;

use crate::events;
use crate::store::opt_ms;

/// How the worker delivers: `config/daemon.json`'s `webhooks` section, durations as `"5s"`, `"48h"`.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Delay before each retry (the last repeats), each with full jitter.
    #[serde(deserialize_with = "durations")]
    pub retry_schedule: Vec<Duration>,
    /// A delivery not delivered this long after it was made is dead.
    #[serde(deserialize_with = "duration")]
    pub deadline: Duration,
    /// How long the secret before a rotation still signs too.
    #[serde(deserialize_with = "duration")]
    pub rotation_overlap: Duration,
    /// An endpoint whose every attempt failed for this long (and at least `disable_after_attempts`
    /// times) is disabled.
    #[serde(deserialize_with = "duration")]
    pub disable_after: Duration,
    pub disable_after_attempts: u32,
    /// Per request, connecting included.
    #[serde(deserialize_with = "duration")]
    pub timeout: Duration,
    pub max_in_flight_per_endpoint: u32,
    pub max_in_flight: u32,
    /// How long delivered rows are kept, and dead ones.
    #[serde(deserialize_with = "duration")]
    pub delivered_retention: Duration,
    #[serde(deserialize_with = "duration")]
    pub dead_retention: Duration,
}

impl Default for Config {
    fn default() -> Self {
        let s = Duration::from_secs;
        Config {
            retry_schedule: vec![s(5), s(30), s(120), s(600), s(1800), s(3600), s(7200)],
            deadline: s(48 * 3600),
            rotation_overlap: s(24 * 3600),
            disable_after: s(24 * 3600),
            disable_after_attempts: 10,
            timeout: s(10),
            max_in_flight_per_endpoint: 1,
            max_in_flight: 8,
            delivered_retention: s(7 * 24 * 3600),
            dead_retention: s(30 * 24 * 3600),
        }
    }
}

impl Config {
    /// Values that would make the worker misbehave.
    pub fn check(&self) -> Result<(), String> {
        if self.retry_schedule.is_empty() || self.retry_schedule.iter().any(Duration::is_zero) {
            return Err("webhooks.retry_schedule needs at least one delay, each above zero".into());
        }
        if self.timeout.is_zero() || self.deadline.is_zero() {
            return Err("webhooks.timeout and webhooks.deadline must be above zero".into());
        }
        if self.max_in_flight == 0 || self.max_in_flight_per_endpoint == 0 {
            return Err("webhooks.max_in_flight and max_in_flight_per_endpoint must be at least 1".into());
        }
        let day = Duration::from_secs(24 * 3600);
        if self.timeout > Duration::from_secs(300) {
            return Err("webhooks.timeout is at most 5m".into());
        }
        if self.deadline > 30 * day || self.rotation_overlap > 30 * day || self.disable_after > 30 * day {
            return Err("webhooks.deadline, rotation_overlap and disable_after are at most 30d".into());
        }
        if self.retry_schedule.iter().any(|d| *d > self.deadline) {
            return Err("a webhooks.retry_schedule step is longer than the deadline".into());
        }
        if self.disable_after_attempts == 0 {
            return Err("webhooks.disable_after_attempts must be at least 1".into());
        }
        if self.max_in_flight > 256 || self.max_in_flight_per_endpoint > self.max_in_flight {
            return Err("webhooks.max_in_flight is at most 256, and max_in_flight_per_endpoint at most that".into());
        }
        Ok(())
    }

    /// How long an attempt may hold its row: its timeout and a margin for reading the answer.
    pub fn lease_ms(&self) -> u64 {
        ms(self.timeout).saturating_mul(2).saturating_add(5_000)
    }

    /// Delay before the retry after `attempts` attempts: the schedule's step, with full jitter
    /// (`jitter` in 0..=1), at least 100 ms.
    pub fn backoff_ms(&self, attempts: u32, jitter: f64) -> u64 {
        let i = (attempts.max(1) as usize - 1).min(self.retry_schedule.len() - 1);
        ((ms(self.retry_schedule[i]) as f64 * jitter.clamp(0.0, 1.0)) as u64).max(100)
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn duration<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
    let text = String::deserialize(d)?;
    humantime::parse_duration(&text).map_err(|e| serde::de::Error::custom(format!("{text:?}: {e}")))
}

fn durations<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<Duration>, D::Error> {
    Vec::<String>::deserialize(d)?
        .iter()
        .map(|t| humantime::parse_duration(t).map_err(|e| serde::de::Error::custom(format!("{t:?}: {e}"))))
        .collect()
}

/// Why a webhook request was refused before it was stored.
#[derive(Debug, thiserror::Error)]
pub enum UrlError {
    #[error("{0:?} is not a URL: {1}")]
    Invalid(String, String),
    #[error("webhook URLs are http:// or https://, not {0}:")]
    Scheme(String),
    #[error("the URL has a user name or password in it; put a token in the path or query instead")]
    Credentials,
    #[error("the URL's port is 0; nothing listens there")]
    PortZero,
    #[error("plain http:// is only for this machine (localhost, 127.0.0.1, ::1); {0} would carry messages unencrypted")]
    InsecureHttp(String),
    #[error("{0} is a broker this daemon uses (on this machine); a webhook cannot post to it")]
    OwnBroker(String),
}

/// Checks a webhook URL: http(s) only, plain http only to loopback unless allowed, no credentials,
/// and not one of `forbidden` (this machine's broker addresses).
pub fn check_url(
    url: &str,
    allow_insecure_http: bool,
    resolved: &[std::net::SocketAddr],
    forbidden_ports: &[u16],
) -> Result<reqwest::Url, UrlError> {
    let mut parsed = reqwest::Url::parse(url).map_err(|e| UrlError::Invalid(url.to_owned(), e.to_string()))?;
    // A fragment is never sent; keeping it would only show a URL that is not the one posted to.
    parsed.set_fragment(None);
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(UrlError::Scheme(parsed.scheme().to_owned()));
    }
    if !parsed.username().is_empty() || parsed.password().is_some() {
        return Err(UrlError::Credentials);
    }
    let host = parsed.host_str().unwrap_or_default().to_owned();
    if parsed.host_str().is_none() {
        return Err(UrlError::Invalid(url.to_owned(), "no host".into()));
    }
    let loopback = is_loopback_host(&parsed);
    if parsed.scheme() == "http" && !loopback && !allow_insecure_http {
        return Err(UrlError::InsecureHttp(host));
    }
    let port = parsed.port_or_known_default().unwrap_or(0);
    if port == 0 {
        return Err(UrlError::PortZero);
    }
    let unspecified = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_unspecified(),
        Some(url::Host::Ipv6(ip)) => is_local(std::net::IpAddr::V6(ip)),
        _ => false,
    };
    let local = loopback || unspecified || resolved.iter().any(|a| is_local(a.ip()));
    if local && forbidden_ports.contains(&port) {
        return Err(UrlError::OwnBroker(format!("{host}:{port}")));
    }
    Ok(parsed)
}

/// `localhost` (with or without its final dot) or a loopback address, IPv4-mapped ones included. Names
/// under `.localhost` are not: they go to the resolver, which could answer with any address.
fn is_loopback_host(url: &reqwest::Url) -> bool {
    match url.host() {
        Some(url::Host::Domain(d)) => d.trim_end_matches('.').eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => std::net::IpAddr::V6(ip).to_canonical().is_loopback(),
        None => false,
    }
}

/// Whether an address is this machine's: loopback or unspecified, IPv4-mapped ones included.
fn is_local(ip: std::net::IpAddr) -> bool {
    let ip = ip.to_canonical();
    ip.is_loopback() || ip.is_unspecified()
}

/// How long a name may take to resolve when a URL is checked against this machine's brokers.
const RESOLVE_TIMEOUT: Duration = Duration::from_secs(5);

/// The ports of the brokers this daemon uses on this machine: the embedded one, and any mesh's broker
/// on a loopback address.
pub async fn broker_ports(d: &crate::daemon::Daemon) -> Result<Vec<u16>, mesh_broker::sqlite::DbError> {
    let embedded = d.embedded_broker.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone();
    let meshes = d.db.call(|c| crate::meshes::list(c)).await?;
    Ok(embedded
        .into_iter()
        .chain(meshes.into_iter().map(|m| m.broker_url))
        .filter_map(|broker| reqwest::Url::parse(&broker).ok())
        .filter(is_loopback_host)
        .filter_map(|u| u.port_or_known_default())
        .collect())
}

/// [`check_url`] against this machine's brokers as they are now, resolving the host when its port is
/// one of theirs.
pub async fn check_url_now(
    d: &crate::daemon::Daemon,
    url: &str,
    allow_insecure_http: bool,
) -> Result<Result<reqwest::Url, UrlError>, mesh_broker::sqlite::DbError> {
    let parsed = match check_url(url, allow_insecure_http, &[], &[]) {
        Ok(p) => p,
        Err(e) => return Ok(Err(e)),
    };
    let forbidden = broker_ports(d).await?;
    let port = parsed.port_or_known_default().unwrap_or(0);
    let mut resolved = Vec::new();
    if forbidden.contains(&port) {
        let host = parsed.host_str().unwrap_or_default().trim_start_matches('[').trim_end_matches(']').to_owned();
        if let Ok(Ok(addrs)) =
            tokio::time::timeout(RESOLVE_TIMEOUT, tokio::net::lookup_host((host.as_str(), port))).await
        {
            resolved.extend(addrs);
        }
    }
    Ok(check_url(url, allow_insecure_http, &resolved, &forbidden))
}

/// A new endpoint, checked.
pub struct NewWebhook {
    pub owner: PublicKey,
    /// A session's mesh (its events are of that mesh only); `None` for the member.
    pub owner_mesh: Option<MeshId>,
    pub url: String,
    pub events: Vec<String>,
    pub mesh: Option<MeshId>,
    pub peer: Option<PublicKey>,
    pub description: Option<String>,
    pub allow_insecure_http: bool,
}

/// Stores an endpoint with a new secret; returns its id and the secret.
pub fn add(conn: &Connection, w: &NewWebhook, now: u64) -> rusqlite::Result<(i64, String)> {
    let secret = sign::new_secret();
    conn.execute(
        "INSERT INTO webhooks (owner, owner_mesh, url, events, mesh_id, peer, description, allow_insecure_http,
             secret, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10)",
        params![
            w.owner.to_string(),
            w.owner_mesh.map(|m| m.to_string()),
            w.url,
            serde_json::to_string(&w.events).expect("kinds serialise"),
            w.mesh.map(|m| m.to_string()),
            w.peer.map(|p| p.to_string()),
            w.description,
            w.allow_insecure_http,
            secret,
            now as i64,
        ],
    )?;
    Ok((conn.last_insert_rowid(), secret))
}

/// Which endpoints a caller may see and manage: a session its own, the member every one.
#[derive(Clone, Copy, Debug)]
pub enum Visible {
    All,
    OwnedBy(PublicKey),
}

impl Visible {
    fn owner(&self) -> Option<String> {
        match self {
            Visible::All => None,
            Visible::OwnedBy(k) => Some(k.to_string()),
        }
    }
}

const INFO_COLUMNS: &str = "w.id, w.url, w.events, COALESCE(m.name, w.mesh_id), w.peer,
    (SELECT p.name FROM peers p WHERE p.key = w.peer LIMIT 1), w.description, w.owner,
    COALESCE(s.name, (SELECT p.name FROM peers p WHERE p.key = w.owner LIMIT 1), ''), s.name, w.enabled,
    w.disabled_reason, w.allow_insecure_http, w.created_at, w.failing_since, w.failures, w.last_success_at,
    w.previous,
    (SELECT COUNT(*) FROM webhook_deliveries d WHERE d.webhook_id = w.id AND d.status = 'pending'),
    (SELECT COUNT(*) FROM webhook_deliveries d WHERE d.webhook_id = w.id AND d.status = 'pending'
        AND d.last_error IS NOT NULL),
    (SELECT COUNT(*) FROM webhook_deliveries d WHERE d.webhook_id = w.id AND d.status = 'delivered'),
    (SELECT COUNT(*) FROM webhook_deliveries d WHERE d.webhook_id = w.id AND d.status = 'dead')";

const INFO_FROM: &str = "webhooks w LEFT JOIN meshes m ON m.id = w.mesh_id LEFT JOIN sessions s ON s.key = w.owner";

fn info_from_row(r: &Row<'_>) -> rusqlite::Result<WebhookInfo> {
    let events: String = r.get(2)?;
    Ok(WebhookInfo {
        id: r.get(0)?,
        url: r.get(1)?,
        events: serde_json::from_str(&events).unwrap_or_default(),
        mesh: r.get(3)?,
        from: r.get(4)?,
        from_name: r.get(5)?,
        description: r.get(6)?,
        owner: r.get(7)?,
        owner_name: r.get(8)?,
        session: r.get(9)?,
        enabled: r.get(10)?,
        disabled_reason: r.get(11)?,
        allow_insecure_http: r.get(12)?,
        created_at: r.get::<_, i64>(13)? as u64,
        failing_since: opt_ms(r, 14)?,
        failures: r.get(15)?,
        last_success_at: opt_ms(r, 16)?,
        previous_secret_until: previous(&r.get::<_, String>(17)?, crate::clock::now_ms()).iter().map(|p| p.until).max(),
        deliveries: WebhookDeliveryCounts {
            pending: r.get::<_, i64>(18)? as u64,
            failing: r.get::<_, i64>(19)? as u64,
            delivered: r.get::<_, i64>(20)? as u64,
            dead: r.get::<_, i64>(21)? as u64,
        },
    })
}

pub fn list(conn: &Connection, visible: Visible) -> rusqlite::Result<Vec<WebhookInfo>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {INFO_COLUMNS} FROM {INFO_FROM} WHERE ?1 IS NULL OR w.owner = ?1 ORDER BY w.id"
    ))?;
    stmt.query_map([visible.owner()], info_from_row)?.collect()
}

pub fn get(conn: &Connection, visible: Visible, id: i64) -> rusqlite::Result<Option<WebhookInfo>> {
    conn.query_row(
        &format!("SELECT {INFO_COLUMNS} FROM {INFO_FROM} WHERE w.id = ?1 AND (?2 IS NULL OR w.owner = ?2)"),
        params![id, visible.owner()],
        info_from_row,
    )
    .optional()
}

/// A secret replaced by a rotation, and until when it still signs.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, Deserialize)]
struct Previous {
    secret: String,
    until: u64,
}

/// Most secrets a request is signed with during overlapping rotations (the current one included).
const MAX_SECRETS: usize = 8;

/// The previous secrets still signing at `now`, newest first.
fn previous(json: &str, now: u64) -> Vec<Previous> {
    let mut all: Vec<Previous> = serde_json::from_str(json).unwrap_or_default();
    all.retain(|p| p.until > now);
    all
}

/// A new secret; the current one keeps signing until `now + overlap`, and the ones before it until
/// their own ends (the newest few). `None`: no such endpoint.
pub fn rotate(
    conn: &Connection,
    visible: Visible,
    id: i64,
    overlap: Duration,
    now: u64,
) -> rusqlite::Result<Option<(String, u64)>> {
    let row: Option<(String, String)> = conn
        .query_row(
            "SELECT secret, previous FROM webhooks WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)",
            params![id, visible.owner()],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .optional()?;
    let Some((current, before)) = row else { return Ok(None) };
    let until = now.saturating_add(ms(overlap));
    let mut kept = vec![Previous { secret: current, until }];
    kept.extend(previous(&before, now));
    kept.truncate(MAX_SECRETS - 1);
    let secret = sign::new_secret();
    conn.execute(
        "UPDATE webhooks SET secret = ?2, previous = ?3 WHERE id = ?1",
        params![id, secret, serde_json::to_string(&kept).expect("secrets serialise")],
    )?;
    Ok(Some((secret, until)))
}

/// Enables or disables an endpoint (by its owner's request, or by the worker), with an event for its
/// owner; enabling also makes its pending deliveries due now. `false`: no such endpoint.
pub fn set_enabled(
    conn: &Connection,
    visible: Visible,
    id: i64,
    enabled: bool,
    reason: Option<&str>,
    now: u64,
) -> rusqlite::Result<bool> {
    let row: Option<(String, String, Option<String>, bool)> = conn
        .query_row(
            "SELECT owner, url, mesh_id, enabled FROM webhooks WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)",
            params![id, visible.owner()],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    let Some((owner, url, mesh, was)) = row else { return Ok(false) };
    if enabled {
        conn.execute(
            "UPDATE webhooks SET enabled = 1, disabled_reason = NULL, failing_since = NULL, failures = 0 WHERE id = ?1",
            [id],
        )?;
        conn.execute(
            "UPDATE webhook_deliveries SET next_attempt_at = ?2 WHERE webhook_id = ?1 AND status = 'pending'",
            params![id, now as i64],
        )?;
    } else {
        conn.execute("UPDATE webhooks SET enabled = 0, disabled_reason = ?2 WHERE id = ?1", params![id, reason])?;
    }
    if was != enabled {
        let owner: PublicKey = mesh_broker::sqlite::parse_col(owner)?;
        let mesh: Option<MeshId> = mesh.map(mesh_broker::sqlite::parse_col).transpose()?;
        let event = EventBody::Webhook(WebhookEvent { id, url, enabled, reason: reason.map(str::to_owned) });
        events::append(conn, mesh.as_ref(), Some(&owner), &event, now)?;
    }
    Ok(true)
}

/// Removes an endpoint and its deliveries. `false`: no such endpoint.
pub fn remove(conn: &Connection, visible: Visible, id: i64) -> rusqlite::Result<bool> {
    let n = conn
        .execute("DELETE FROM webhooks WHERE id = ?1 AND (?2 IS NULL OR owner = ?2)", params![id, visible.owner()])?;
    if n == 1 {
        conn.execute("DELETE FROM webhook_deliveries WHERE webhook_id = ?1", [id])?;
    }
    Ok(n == 1)
}

/// The peer an event concerns, for an endpoint's `from` filter.
fn peer_of(body: &EventBody) -> Option<&str> {
    match body {
        EventBody::Message(m) => Some(&m.from),
        EventBody::Receipt(r) => Some(&r.recipient),
        EventBody::Presence(p) => Some(&p.key),
        _ => None,
    }
}

/// The delivery deadline [`enqueue`] gives new rows (from the configuration, set at start-up).
static DEADLINE_MS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(48 * 3600 * 1000);

pub fn set_deadline(deadline: Duration) {
    DEADLINE_MS.store(ms(deadline), std::sync::atomic::Ordering::Relaxed);
}

fn deadline() -> Duration {
    Duration::from_millis(DEADLINE_MS.load(std::sync::atomic::Ordering::Relaxed))
}

/// Queues a delivery of one event to every endpoint that wants it: owned by its audience (or, for
/// presence, by an identity of its mesh), asking for its kind, and matching its mesh and peer
/// filters. Runs in the event's transaction. Disabled endpoints queue too: enabling one resumes them.
pub fn enqueue(
    conn: &Connection,
    event_id: i64,
    mesh: Option<&MeshId>,
    audience: Option<&PublicKey>,
    body: &EventBody,
    now: u64,
) -> rusqlite::Result<usize> {
    let kind = body.kind();
    if !mesh_ipc::api::WEBHOOK_EVENT_KINDS.contains(&kind) {
        return Ok(0);
    }
    let mesh_text = mesh.map(MeshId::to_string);
    let mut stmt = conn.prepare_cached(
        "SELECT id FROM webhooks
         WHERE (owner = ?1 OR (?1 IS NULL AND (owner_mesh IS NULL OR owner_mesh = ?2)))
           AND EXISTS (SELECT 1 FROM json_each(events) WHERE value = ?3)
           AND (mesh_id IS NULL OR mesh_id = ?2)
           AND (peer IS NULL OR peer = ?4)",
    )?;
    let ids: Vec<i64> = stmt
        .query_map(params![audience.map(PublicKey::to_string), mesh_text, kind, peer_of(body)], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if ids.is_empty() {
        return Ok(0);
    }
    let mut data = serde_json::to_value(body).expect("events serialise");
    let data = data.get_mut("data").map(serde_json::Value::take).unwrap_or_default();
    let mut data = match data {
        serde_json::Value::Object(map) => map,
        other => serde_json::Map::from_iter([("value".to_owned(), other)]),
    };
    data.insert("event_id".into(), event_id.into());
    if let Some(m) = &mesh_text {
        data.insert("mesh_id".into(), m.clone().into());
        if !data.contains_key("mesh") {
            let name: Option<String> =
                conn.query_row("SELECT name FROM meshes WHERE id = ?1", [m], |r| r.get(0)).optional()?;
            data.insert("mesh".into(), name.unwrap_or_else(|| m.clone()).into());
        }
    }
    if let Some(a) = audience {
        data.insert("audience".into(), a.to_string().into());
    }
    let payload = payload(kind, now, serde_json::Value::Object(data));
    let inbox_id = match body {
        EventBody::Message(m) => Some(m.id),
        _ => None,
    };
    for id in &ids {
        insert_delivery(conn, *id, kind, Some(event_id), inbox_id, &payload, now, deadline())?;
    }
    Ok(ids.len())
}

/// A Standard Webhooks body: `{type, timestamp, data}`.
fn payload(kind: &str, now: u64, data: serde_json::Value) -> String {
    let at = std::time::UNIX_EPOCH + Duration::from_millis(now);
    serde_json::json!({
        "type": kind,
        "timestamp": humantime::format_rfc3339_millis(at).to_string(),
        "data": data,
    })
    .to_string()
}

#[allow(clippy::too_many_arguments)]
fn insert_delivery(
    conn: &Connection,
    webhook: i64,
    kind: &str,
    event_id: Option<i64>,
    inbox_id: Option<i64>,
    payload: &str,
    now: u64,
    deadline: Duration,
) -> rusqlite::Result<i64> {
    let mut uid = [0u8; 16];
    rand::RngCore::fill_bytes(&mut rand::rngs::OsRng, &mut uid);
    conn.prepare_cached(
        "INSERT INTO webhook_deliveries (webhook_id, uid, event_type, event_id, inbox_id, payload, status,
             next_attempt_at, deadline, created_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'pending', ?7, ?8, ?7)",
    )?
    .execute(params![
        webhook,
        format!("msg_{}", hex::encode(uid)),
        kind,
        event_id,
        inbox_id,
        payload,
        now as i64,
        now.saturating_add(ms(deadline)) as i64
    ])?;
    Ok(conn.last_insert_rowid())
}

/// Queues a `webhook.test` delivery to one endpoint. `None`: no such endpoint.
pub fn enqueue_test(
    conn: &Connection,
    visible: Visible,
    id: i64,
    now: u64,
    deadline: Duration,
) -> rusqlite::Result<Option<i64>> {
    let Some(w) = get(conn, visible, id)? else { return Ok(None) };
    let data = serde_json::json!({
        "webhook_id": w.id,
        "message": "a test delivery from `mesh webhook test`",
        "audience": w.owner,
    });
    let payload = payload("webhook.test", now, data);
    insert_delivery(conn, id, "webhook.test", None, None, &payload, now, deadline).map(Some)
}

/// A delivery's columns, with whether its endpoint is enabled (a disabled one's deliveries have no
/// next attempt).
const DELIVERY_COLUMNS: &str = "id, webhook_id, uid, event_type, event_id, status, attempts, created_at,
    next_attempt_at, deadline, last_attempt_at, last_status, last_error, delivered_at,
    COALESCE((SELECT enabled FROM webhooks w WHERE w.id = webhook_id), 0)";

fn delivery_from_row(r: &Row<'_>) -> rusqlite::Result<DeliveryInfo> {
    let status: String = r.get(5)?;
    let status = match status.as_str() {
        "delivered" => DeliveryStatus::Delivered,
        "dead" => DeliveryStatus::Dead,
        _ => DeliveryStatus::Pending,
    };
    Ok(DeliveryInfo {
        id: r.get(0)?,
        webhook_id: r.get(1)?,
        message_id: r.get(2)?,
        event_type: r.get(3)?,
        event_id: r.get(4)?,
        attempts: r.get(6)?,
        created_at: r.get::<_, i64>(7)? as u64,
        next_attempt_at: if status == DeliveryStatus::Pending && r.get::<_, bool>(14)? { opt_ms(r, 8)? } else { None },
        deadline: r.get::<_, i64>(9)? as u64,
        last_attempt_at: opt_ms(r, 10)?,
        last_status: r.get::<_, Option<i64>>(11)?.and_then(|s| u16::try_from(s).ok()),
        last_error: r.get(12)?,
        delivered_at: opt_ms(r, 13)?,
        status,
    })
}

pub fn delivery(conn: &Connection, visible: Visible, id: i64) -> rusqlite::Result<Option<DeliveryInfo>> {
    conn.query_row(
        &format!(
            "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries WHERE id = ?1
             AND webhook_id IN (SELECT id FROM webhooks WHERE ?2 IS NULL OR owner = ?2)"
        ),
        params![id, visible.owner()],
        delivery_from_row,
    )
    .optional()
}

/// An endpoint's deliveries, newest first.
pub fn deliveries(conn: &Connection, webhook: i64, q: &DeliveriesQuery) -> rusqlite::Result<Vec<DeliveryInfo>> {
    let (status, failed) = match q.status {
        None => (None, false),
        Some(DeliveryFilter::Pending) => (Some("pending"), false),
        Some(DeliveryFilter::Failed) => (Some("pending"), true),
        Some(DeliveryFilter::Delivered) => (Some("delivered"), false),
        Some(DeliveryFilter::Dead) => (Some("dead"), false),
    };
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {DELIVERY_COLUMNS} FROM webhook_deliveries
         WHERE webhook_id = ?1 AND (?2 IS NULL OR status = ?2) AND (NOT ?3 OR last_error IS NOT NULL)
         ORDER BY id DESC LIMIT ?4"
    ))?;
    let limit = q.limit.unwrap_or(50).clamp(1, 10_000); // the route refuses others
    stmt.query_map(params![webhook, status, failed, limit], delivery_from_row)?.collect()
}

/// Makes deliveries pending again, due now, with a new deadline: one (any state), or every dead one
/// of an endpoint. Returns how many.
pub fn redeliver(conn: &Connection, target: Redeliver, now: u64, deadline: Duration) -> rusqlite::Result<usize> {
    let (sql, id) = match target {
        Redeliver::One(id) => ("id = ?1", id),
        Redeliver::AllDead(webhook) => ("webhook_id = ?1 AND status = 'dead'", webhook),
    };
    conn.execute(
        &format!(
            "UPDATE webhook_deliveries SET status = 'pending', round_start = attempts, next_attempt_at = ?2, deadline = ?3,
                 delivered_at = NULL WHERE {sql}"
        ),
        params![id, now as i64, now.saturating_add(ms(deadline)) as i64],
    )
}

#[derive(Clone, Copy, Debug)]
pub enum Redeliver {
    One(i64),
    AllDead(i64),
}

/// For `mesh daemon status`.
pub fn status(conn: &Connection) -> rusqlite::Result<WebhookStatus> {
    let (endpoints, pending, failing, delivered, dead) = conn.query_row(
        "SELECT (SELECT COUNT(*) FROM webhooks),
            COALESCE(SUM(status = 'pending'), 0), COALESCE(SUM(status = 'pending' AND last_error IS NOT NULL), 0),
            COALESCE(SUM(status = 'delivered'), 0), COALESCE(SUM(status = 'dead'), 0)
         FROM webhook_deliveries",
        [],
        |r| {
            Ok((
                r.get::<_, i64>(0)?,
                r.get::<_, i64>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, i64>(3)?,
                r.get::<_, i64>(4)?,
            ))
        },
    )?;
    let disabled = conn
        .prepare_cached("SELECT id, url, COALESCE(disabled_reason, '') FROM webhooks WHERE enabled = 0 ORDER BY id")?
        .query_map([], |r| Ok(DisabledWebhook { id: r.get(0)?, url: r.get(1)?, reason: r.get(2)? }))?
        .collect::<Result<_, _>>()?;
    Ok(WebhookStatus {
        endpoints: endpoints as u64,
        deliveries: WebhookDeliveryCounts {
            pending: pending as u64,
            failing: failing as u64,
            delivered: delivered as u64,
            dead: dead as u64,
        },
        disabled,
    })
}

/// One attempt's worth of work, claimed under a lease.
#[derive(Clone, Debug)]
pub struct Job {
    pub delivery: i64,
    pub webhook: i64,
    pub uid: String,
    pub url: String,
    pub payload: String,
    /// The current secret, then the previous one while its overlap lasts.
    pub secrets: Vec<String>,
    pub lease_until: u64,
}

/// What the worker should do next: the jobs it claimed, and when to look again at the latest.
#[derive(Debug, Default)]
pub struct Claimed {
    pub jobs: Vec<Job>,
    /// The earliest time a delivery not claimed now could be (a retry falling due, a lease running
    /// out); `None` when nothing is waiting on time.
    pub next_at: Option<u64>,
}

/// A successful answer slower than this puts its endpoint among the limited ones (see [`Caps`]).
pub const SLOW_ANSWER: Duration = Duration::from_secs(1);

/// How much the worker may claim now.
#[derive(Clone, Copy, Debug)]
pub struct Caps {
    /// Free slots in all.
    pub free: usize,
    /// In flight to one endpoint.
    pub per_endpoint: u32,
    /// In flight, in all, to endpoints not yet known to answer promptly (never answered 2xx, failed
    /// their last attempt, or took over [`SLOW_ANSWER`] to succeed): the rest of the slots stay for the
    /// endpoints that answer at once, which slow or hanging endpoints therefore cannot starve.
    pub limited: usize,
}

impl Caps {
    /// The caps from the configuration, with `free` slots free.
    pub fn new(cfg: &Config, free: usize) -> Caps {
        Caps { free, per_endpoint: cfg.max_in_flight_per_endpoint, limited: (cfg.max_in_flight as usize / 2).max(1) }
    }
}

/// One enabled endpoint as [`claim`] sees it.
#[derive(Clone, Copy)]
struct Load {
    webhook: i64,
    /// Its deliveries being attempted (under a lease).
    inflight: i64,
    /// When its earliest delivery not being attempted is due.
    due: Option<i64>,
    /// When the earliest lease on its deliveries runs out.
    lease_ends: Option<i64>,
    /// Not known to answer promptly (see [`Caps::limited`]).
    limited: bool,
}

/// Claims due deliveries within `caps`, taking endpoints in turn from `start` so that one busy
/// endpoint does not take every slot. Each endpoint's deliveries go oldest first (by due time, then
/// creation).
pub fn claim(conn: &mut Connection, caps: Caps, start: usize, lease_ms: u64, now: u64) -> rusqlite::Result<Claimed> {
    let tx = conn.transaction()?;
    let now_i = now as i64;
    let endpoints: Vec<Load> = tx
        .prepare_cached(
            "SELECT w.id,
                (SELECT COUNT(*) FROM webhook_deliveries d WHERE d.webhook_id = w.id AND d.status = 'pending'
                    AND d.lease_until > ?1),
                (SELECT MIN(d.next_attempt_at) FROM webhook_deliveries d WHERE d.webhook_id = w.id
                    AND d.status = 'pending' AND (d.lease_until IS NULL OR d.lease_until <= ?1)),
                (SELECT MIN(d.lease_until) FROM webhook_deliveries d WHERE d.webhook_id = w.id
                    AND d.status = 'pending' AND d.lease_until > ?1),
                w.failing_since IS NOT NULL OR w.last_success_at IS NULL OR w.slow = 1
             FROM webhooks w WHERE w.enabled = 1 ORDER BY w.id",
        )?
        .query_map([now_i], |r| {
            Ok(Load {
                webhook: r.get(0)?,
                inflight: r.get(1)?,
                due: r.get(2)?,
                lease_ends: r.get(3)?,
                limited: r.get(4)?,
            })
        })?
        .collect::<Result<_, _>>()?;
    let mut out = Claimed::default();
    let mut wake = |at: i64| {
        let at = at.max(0) as u64;
        out.next_at = Some(out.next_at.map_or(at, |n: u64| n.min(at)));
    };
    let limited_in_flight: i64 = endpoints.iter().filter(|e| e.limited).map(|e| e.inflight).sum();
    let mut limited_room = usize::try_from(limited_in_flight).map_or(0, |n| caps.limited.saturating_sub(n));
    let mut jobs = Vec::new();
    let n = endpoints.len();
    for i in 0..n {
        let Load { webhook, inflight, due, lease_ends, limited } = endpoints[(start + i) % n];
        if let Some(l) = lease_ends {
            wake(l);
        }
        let mut room = (caps.per_endpoint as i64 - inflight).max(0) as usize;
        if limited {
            room = room.min(limited_room);
        }
        let Some(due) = due else { continue };
        if room == 0 {
            continue; // it is woken when an attempt finishes
        }
        if due > now_i || jobs.len() >= caps.free {
            wake(due);
            continue;
        }
        let take = room.min(caps.free - jobs.len());
        let ids: Vec<i64> = tx
            .prepare_cached(
                "SELECT id FROM webhook_deliveries WHERE webhook_id = ?1 AND status = 'pending'
                   AND next_attempt_at <= ?2 AND (lease_until IS NULL OR lease_until <= ?2)
                 ORDER BY next_attempt_at, id LIMIT ?3",
            )?
            .query_map(params![webhook, now_i, take as i64], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        if limited {
            limited_room -= ids.len();
        }
        for id in ids {
            jobs.push(lease(&tx, id, now, lease_ms)?);
        }
        // More may be due behind these; they are claimed when these finish.
    }
    tx.commit()?;
    out.jobs = jobs;
    Ok(out)
}

fn lease(tx: &Connection, id: i64, now: u64, lease_ms: u64) -> rusqlite::Result<Job> {
    let until = now.saturating_add(lease_ms);
    // An attempt counts from its start: one cut short by a crash was made all the same.
    tx.prepare_cached("UPDATE webhook_deliveries SET lease_until = ?2, attempts = attempts + 1 WHERE id = ?1")?
        .execute(params![id, until as i64])?;
    tx.prepare_cached(
        "SELECT d.id, d.webhook_id, d.uid, w.url, d.payload, w.secret, w.previous
         FROM webhook_deliveries d JOIN webhooks w ON w.id = d.webhook_id WHERE d.id = ?1",
    )?
    .query_row(params![id], |r| {
        let before: String = r.get(6)?;
        Ok(Job {
            delivery: r.get(0)?,
            webhook: r.get(1)?,
            uid: r.get(2)?,
            url: r.get(3)?,
            payload: r.get(4)?,
            secrets: std::iter::once(r.get(5)?).chain(previous(&before, now).into_iter().map(|p| p.secret)).collect(),
            lease_until: until,
        })
    })
}

/// At start-up: this process is the only worker, so no lease taken before is still held.
pub fn release_leases(conn: &Connection) -> rusqlite::Result<usize> {
    conn.execute("UPDATE webhook_deliveries SET lease_until = NULL WHERE lease_until IS NOT NULL", [])
}

/// How one attempt ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// A 2xx answer; `slow` when it took more than [`SLOW_ANSWER`].
    Delivered { status: u16, slow: bool },
    /// 410 Gone: the endpoint asks not to be called again.
    Gone,
    /// Not posted: the URL has become a broker this daemon uses (one was started on its port).
    OwnBroker(String),
    /// Worth retrying: no answer in time, no connection, 5xx, 429 (with its `Retry-After`).
    Retry { status: Option<u16>, error: String, retry_after: Option<Duration> },
    /// A 3xx or another 4xx: retried once, then dead.
    Refused { status: u16, error: String },
}

/// What [`settle`] did, for logs and tests.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Settled {
    Delivered,
    RetryAt(u64),
    Dead,
    /// The endpoint was disabled; the delivery waits for it to be enabled.
    Disabled,
    /// The lease was no longer ours (the row was redelivered, removed, or its lease ran out and it
    /// was claimed again): nothing recorded.
    Stale,
}

/// Records one attempt's outcome, in one transaction, if the job still holds its lease.
pub fn settle(
    conn: &mut Connection,
    job: &Job,
    outcome: &Outcome,
    cfg: &Config,
    now: u64,
    jitter: f64,
) -> rusqlite::Result<Settled> {
    let tx = conn.transaction()?;
    let row: Option<(u32, u32, i64)> = tx
        .query_row(
            "SELECT attempts, round_start, deadline FROM webhook_deliveries
             WHERE id = ?1 AND status = 'pending' AND lease_until = ?2",
            params![job.delivery, job.lease_until as i64],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .optional()?;
    let Some((attempts, round_start, deadline)) = row else { return Ok(Settled::Stale) };
    // Attempts since the delivery was made, or last redelivered: what the retry rules count.
    let this_round = attempts.saturating_sub(round_start);
    let (status, error) = match outcome {
        Outcome::Delivered { status, .. } => (Some(*status), None),
        Outcome::Gone => (Some(410), Some("410 Gone: the endpoint asked not to be called again".to_owned())),
        Outcome::OwnBroker(why) => (None, Some(why.clone())),
        Outcome::Retry { status, error, .. } => (*status, Some(error.clone())),
        Outcome::Refused { status, error } => (Some(*status), Some(error.clone())),
    };
    tx.execute(
        "UPDATE webhook_deliveries SET last_attempt_at = ?2, last_status = ?3, last_error = ?4, lease_until = NULL
         WHERE id = ?1",
        params![job.delivery, now as i64, status, error],
    )?;
    let settled = match outcome {
        Outcome::Delivered { slow, .. } => {
            tx.execute(
                "UPDATE webhook_deliveries SET status = 'delivered', delivered_at = ?2 WHERE id = ?1",
                params![job.delivery, now as i64],
            )?;
            tx.execute(
                "UPDATE webhooks SET failing_since = NULL, failures = 0, last_success_at = ?2, slow = ?3 WHERE id = ?1",
                params![job.webhook, now as i64, slow],
            )?;
            Settled::Delivered
        }
        Outcome::Gone => {
            set_enabled(&tx, Visible::All, job.webhook, false, Some("it answered 410 Gone"), now)?;
            Settled::Disabled
        }
        Outcome::OwnBroker(why) => {
            set_enabled(&tx, Visible::All, job.webhook, false, Some(why), now)?;
            Settled::Disabled
        }
        Outcome::Retry { .. } | Outcome::Refused { .. } => {
            tx.execute(
                "UPDATE webhooks SET failing_since = COALESCE(failing_since, ?2), failures = failures + 1 WHERE id = ?1",
                params![job.webhook, now as i64],
            )?;
            let permanent = matches!(outcome, Outcome::Refused { .. }) && this_round >= 2;
            // Never sooner than the schedule, nor than the endpoint's `Retry-After`; a retry that
            // would fall past the deadline is made at the deadline, the last one.
            let backoff = cfg.backoff_ms(this_round, jitter);
            let delay = match outcome {
                Outcome::Retry { retry_after: Some(after), .. } => ms(*after).max(backoff),
                _ => backoff,
            };
            let next = now.saturating_add(delay).min(deadline.max(0) as u64);
            let settled = if permanent || now as i64 >= deadline {
                tx.execute("UPDATE webhook_deliveries SET status = 'dead' WHERE id = ?1", [job.delivery])?;
                Settled::Dead
            } else {
                tx.execute(
                    "UPDATE webhook_deliveries SET next_attempt_at = ?2 WHERE id = ?1",
                    params![job.delivery, next as i64],
                )?;
                Settled::RetryAt(next)
            };
            let (since, failures): (i64, u32) =
                tx.query_row("SELECT failing_since, failures FROM webhooks WHERE id = ?1", [job.webhook], |r| {
                    Ok((r.get(0)?, r.get(1)?))
                })?;
            if failures >= cfg.disable_after_attempts && now.saturating_sub(since as u64) >= ms(cfg.disable_after) {
                let reason = format!(
                    "every attempt failed for {} ({failures} attempts); the last: {}",
                    humantime::format_duration(Duration::from_secs(now.saturating_sub(since as u64) / 1000)),
                    error.as_deref().unwrap_or("failed")
                );
                set_enabled(&tx, Visible::All, job.webhook, false, Some(&reason), now)?;
                Settled::Disabled
            } else {
                settled
            }
        }
    };
    tx.commit()?;
    Ok(settled)
}

/// Housekeeping the worker does on a timer: pending deliveries past their deadline become dead (those
/// of disabled endpoints too), and previous secrets past their overlap are forgotten.
pub fn maintain(conn: &Connection, now: u64) -> rusqlite::Result<(usize, usize)> {
    let dead = conn.execute(
        "UPDATE webhook_deliveries SET status = 'dead', lease_until = NULL,
             last_error = COALESCE(last_error, 'never attempted') || ' (deadline passed)'
         WHERE status = 'pending' AND deadline < ?1 AND (lease_until IS NULL OR lease_until <= ?1)",
        [now as i64],
    )?;
    let rows: Vec<(i64, String)> = conn
        .prepare_cached("SELECT id, previous FROM webhooks WHERE previous != '[]'")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let mut forgotten = 0;
    for (id, before) in rows {
        let all: Vec<Previous> = serde_json::from_str(&before).unwrap_or_default();
        let kept = previous(&before, now);
        if kept.len() != all.len() {
            forgotten += all.len() - kept.len();
            conn.execute(
                "UPDATE webhooks SET previous = ?2 WHERE id = ?1",
                params![id, serde_json::to_string(&kept).expect("secrets serialise")],
            )?;
        }
    }
    Ok((dead, forgotten))
}

/// Retention: delivered rows after `delivered_retention`, dead ones after `dead_retention`.
pub fn prune(conn: &Connection, cfg: &Config, now: u64) -> rusqlite::Result<usize> {
    let before = |d: Duration| now.saturating_sub(ms(d)) as i64;
    Ok(conn.execute(
        "DELETE FROM webhook_deliveries WHERE status = 'delivered' AND delivered_at < ?1",
        [before(cfg.delivered_retention)],
    )? + conn.execute(
        "DELETE FROM webhook_deliveries WHERE status = 'dead' AND COALESCE(last_attempt_at, created_at) < ?1",
        [before(cfg.dead_retention)],
    )?)
}

/// A jitter factor for [`settle`].
pub fn jitter() -> f64 {
    rand::thread_rng().gen_range(0.0..=1.0)
}

#[cfg(test)]
mod tests;
