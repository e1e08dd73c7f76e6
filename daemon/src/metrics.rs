//! `GET /v1/metrics`: the daemon's figures in the Prometheus text format (docs/operations.md).
//!
//! Most are read from `daemon.db` and the live links when scraped; counters of what the daemon did
//! since it started live here. Labels are bounded: a status, a state, a mesh's name — never a key.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::Registry;

use mesh_ipc::api::{InboxCounts, LinkState, OutboxCounts, WebhookStatus};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabel {
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MeshStateLabel {
    mesh: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

/// What the daemon counts while it runs.
pub struct Counters {
    /// Webhook attempts, by how they ended.
    pub webhook_attempts: Family<ResultLabel, Counter>,
}

/// How a webhook attempt can end: delivered, to be retried, dead, its endpoint disabled, or recorded
/// by nobody (its lease had passed to another attempt).
const ATTEMPT_RESULTS: [&str; 5] = ["delivered", "retry", "dead", "disabled", "stale"];

impl Default for Counters {
    /// Every result at 0, so that a scraper sees each series from the start.
    fn default() -> Self {
        let webhook_attempts = Family::<ResultLabel, Counter>::default();
        for result in ATTEMPT_RESULTS {
            webhook_attempts.get_or_create(&ResultLabel { result }).inc_by(0);
        }
        Counters { webhook_attempts }
    }
}

impl Counters {
    pub fn webhook_attempt(&self, result: &'static str) {
        self.webhook_attempts.get_or_create(&ResultLabel { result }).inc();
    }
}

/// What a scrape reads from the database and the links.
pub struct Snapshot {
    pub outbox: OutboxCounts,
    pub inbox: InboxCounts,
    pub webhooks: WebhookStatus,
    /// Each mesh's name and the state of the member's link to it.
    pub links: Vec<(String, LinkState)>,
    pub live_sessions: u64,
}

const LINK_STATES: [LinkState; 4] = [LinkState::Connecting, LinkState::Online, LinkState::Offline, LinkState::Rejected];

/// A gauge per `(label value, figure)`, labelled by `label`.
fn gauges<L>(pairs: &[(&'static str, u64)], label: impl Fn(&'static str) -> L) -> Family<L, Gauge>
where
    L: Clone + std::hash::Hash + Eq + EncodeLabelSet + std::fmt::Debug + Send + Sync + 'static,
{
    let family = Family::<L, Gauge>::default();
    for (value, n) in pairs {
        family.get_or_create(&label(value)).set(i64::try_from(*n).unwrap_or(i64::MAX));
    }
    family
}

/// The text exposition.
pub fn render(counters: &Counters, s: &Snapshot) -> String {
    let mut registry = Registry::with_prefix("mesh_daemon");
    registry.register("build", "The daemon's version", Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]));
    let o = &s.outbox;
    registry.register(
        "outbox",
        "Outbox rows, by status",
        gauges(
            &[
                ("pending", o.pending),
                ("inflight", o.inflight),
                ("done", o.done),
                ("dead", o.dead),
                ("aborted", o.aborted),
            ],
            |status| StatusLabel { status },
        ),
    );
    let i = &s.inbox;
    registry.register(
        "inbox",
        "Inbox rows: unread, failed to read, and in all",
        gauges(&[("unread", i.unread), ("failed", i.failed), ("total", i.total)], |state| StateLabel { state }),
    );
    let links = Family::<MeshStateLabel, Gauge>::default();
    for (mesh, state) in &s.links {
        for candidate in LINK_STATES {
            links
                .get_or_create(&MeshStateLabel { mesh: mesh.clone(), state: candidate.as_str() })
                .set(i64::from(*state == candidate));
        }
    }
    registry.register("link", "The member's connection to each mesh's broker: 1 for its state", links);
    let sessions = Gauge::<i64>::default();
    sessions.set(i64::try_from(s.live_sessions).unwrap_or(i64::MAX));
    registry.register("sessions_live", "Sessions whose process is running", sessions);
    let w = &s.webhooks;
    let disabled = w.disabled.len() as u64;
    registry.register(
        "webhook_endpoints",
        "Webhook endpoints, enabled or disabled",
        gauges(&[("enabled", w.endpoints.saturating_sub(disabled)), ("disabled", disabled)], |state| StateLabel {
            state,
        }),
    );
    let d = &w.deliveries;
    registry.register(
        "webhook_deliveries",
        "Webhook deliveries, by status (failing: pending after a failed attempt, counted in pending too)",
        gauges(
            &[("pending", d.pending), ("failing", d.failing), ("delivered", d.delivered), ("dead", d.dead)],
            |status| StatusLabel { status },
        ),
    );
    registry.register(
        "webhook_attempts",
        "Webhook attempts since the daemon started, by how they ended",
        counters.webhook_attempts.clone(),
    );
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &registry).expect("writing to a String");
    out
}
