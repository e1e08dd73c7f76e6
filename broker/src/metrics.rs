//! Prometheus metrics (`mesh broker serve --metrics-listen ADDR`, docs/operations.md).
//!
//! Counters and gauges are updated where things happen; the queue's depth and oldest message per mesh
//! are read from the store when scraped. Labels are bounded: a result is `ok`/`accepted` or an error
//! code, a kind is member or session, a mesh is a mesh id — never a key.

use std::sync::Arc;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::metrics::info::Info;
use prometheus_client::registry::{Registry, Unit};

use crate::store::QueueStat;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabel {
    pub result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MeshLabel {
    mesh: String,
}

pub struct Metrics {
    registry: Registry,
    pub connections: Family<KindLabel, Gauge>,
    pub handshakes: Family<ResultLabel, Counter>,
    pub sends: Family<ResultLabel, Counter>,
    pub deliveries: Counter,
    pub redeliveries: Counter,
    pub acks: Counter,
    pub receipts: Family<KindLabel, Counter>,
    pub expired: Counter,
    queue_depth: Family<MeshLabel, Gauge>,
    queue_oldest: Family<MeshLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    pub commit_seconds: Histogram,
    pub batch_size: Histogram,
    /// On PostgreSQL: this replica's heartbeats, by result (ok or failed).
    pub heartbeats: Family<ResultLabel, Counter>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::with_prefix("mesh_broker");
        let connections = Family::<KindLabel, Gauge>::default();
        let receipts = Family::<KindLabel, Counter>::default();
        for kind in ["member", "session"] {
            connections.get_or_create(&KindLabel { kind }).set(0);
        }
        for kind in ["delivered", "read", "expired"] {
            receipts.get_or_create(&KindLabel { kind }).inc_by(0);
        }
        let m = Metrics {
            registry: Registry::default(),
            connections,
            handshakes: Family::default(),
            sends: Family::default(),
            deliveries: Counter::default(),
            redeliveries: Counter::default(),
            acks: Counter::default(),
            receipts,
            expired: Counter::default(),
            queue_depth: Family::default(),
            queue_oldest: Family::default(),
            commit_seconds: Histogram::new(exponential_buckets(0.0001, 2.0, 16)),
            batch_size: Histogram::new(exponential_buckets(1.0, 2.0, 12)),
            heartbeats: Family::default(),
        };
        registry.register("build", "The broker's version", Info::new(vec![("version", env!("CARGO_PKG_VERSION"))]));
        registry.register("connections", "Authenticated connections open now, by kind", m.connections.clone());
        registry.register("handshakes", "Handshakes, by result (ok or the error code)", m.handshakes.clone());
        registry.register("sends", "Sends answered, by result (accepted or the error code)", m.sends.clone());
        registry.register("deliveries", "Queue items pushed to their recipient the first time", m.deliveries.clone());
        registry.register("redeliveries", "Queue items pushed again after a lease ran out", m.redeliveries.clone());
        registry.register("acks", "Delivery ids acked by recipients", m.acks.clone());
        registry.register("receipts", "Receipts queued for senders, by kind", m.receipts.clone());
        registry.register("expired", "Queued messages dropped at their TTL", m.expired.clone());
        registry.register("queue_depth", "Items queued (messages and receipts), per mesh", m.queue_depth.clone());
        registry.register_with_unit(
            "queue_oldest_age",
            "Age of the oldest queued message, per mesh",
            Unit::Seconds,
            m.queue_oldest.clone(),
        );
        registry.register_with_unit(
            "store_commit",
            "Time to commit one batch of store writes",
            Unit::Seconds,
            m.commit_seconds.clone(),
        );
        registry.register("store_batch_size", "Writes committed together in one batch", m.batch_size.clone());
        registry.register(
            "replica_heartbeats",
            "This replica's heartbeats to the shared database, by result (ok or failed)",
            m.heartbeats.clone(),
        );
        Arc::new(Metrics { registry, ..m })
    }

    /// `n` receipts of `kind` (delivered, read, expired) queued for senders.
    pub fn receipts_queued(&self, kind: &'static str, n: u64) {
        self.receipts.get_or_create(&KindLabel { kind }).inc_by(n);
    }

    pub fn count(family: &Family<ResultLabel, Counter>, result: &'static str) {
        family.get_or_create(&ResultLabel { result }).inc();
    }

    /// The text exposition, with the queue figures read at this scrape.
    pub fn encode(&self, queues: &[QueueStat]) -> String {
        self.queue_depth.clear();
        self.queue_oldest.clear();
        for q in queues {
            let label = MeshLabel { mesh: q.mesh.to_string() };
            self.queue_depth.get_or_create(&label).set(i64::try_from(q.depth).unwrap_or(i64::MAX));
            self.queue_oldest.get_or_create(&label).set(q.oldest_ms as f64 / 1000.0);
        }
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }
}
