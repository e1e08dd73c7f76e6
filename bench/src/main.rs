//! `mesh-bench`: the project's benchmarks. Each scenario prints a table, or with `--json` one JSON
//! object per line whose last line is the summary (`delivered_ratio`, `p50_ms`, `p95_ms`, `p99_ms`,
//! `msgs_per_s`, `peak_rss_mb`, … as the scenario has them). Results and how they compare with the
//! targets are in `docs/benchmarks.md`.

mod fanout;
mod load;
mod mcp;
mod peer;
mod procs;
mod replicas;
mod send;
mod stats;
mod throughput;
mod webhook;

use std::path::PathBuf;
use std::time::Duration;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "mesh-bench", about = "Benchmarks of mesh against its targets")]
struct Cli {
    /// One JSON object per line instead of a table
    #[arg(long, global = true)]
    json: bool,
    /// The mesh binary (default: $MESH_BIN, else next to this one)
    #[arg(long, global = true)]
    mesh_bin: Option<PathBuf>,
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand, Debug)]
enum Scenario {
    /// `mesh send` as a whole process, and the daemon's accept path alone
    Send {
        #[arg(long, default_value_t = 300)]
        runs: usize,
    },
    /// N peers on one broker, each sending M encrypted DMs to random peers
    Load {
        #[arg(long, default_value_t = 10)]
        peers: usize,
        #[arg(long, default_value_t = 100)]
        msgs: usize,
        /// Messages per second offered by all peers together (default: as fast as they can)
        #[arg(long)]
        rate: Option<f64>,
        #[arg(long, default_value = "900s", value_parser = humantime_like)]
        timeout: Duration,
        /// Run it again over wss:// (self-signed TLS) in the same run, and report TLS's cost
        #[arg(long)]
        tls: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// The broker's sustained durable rate, beside NATS JetStream in the same run
    Throughput {
        #[arg(long, default_value_t = 4)]
        senders: usize,
        #[arg(long, default_value_t = 25_000)]
        msgs: usize,
        #[arg(long, default_value_t = 256)]
        body_bytes: usize,
        /// Skip the NATS JetStream reference
        #[arg(long)]
        no_nats: bool,
        /// Run it again over wss:// (self-signed TLS) in the same run, and report TLS's cost
        #[arg(long)]
        tls: bool,
        #[command(flatten)]
        store: StoreArgs,
    },
    /// SQLite, PostgreSQL with one replica and with three, in one run: throughput and load on each,
    /// the wake-up latency across replicas, and how soon messages flow again after a replica is killed
    Replicas {
        #[arg(long, default_value_t = 100)]
        peers: usize,
        #[arg(long, default_value_t = 1000)]
        msgs: usize,
        /// Throughput: senders, and messages each
        #[arg(long, default_value_t = 4)]
        senders: usize,
        #[arg(long, default_value_t = 25_000)]
        sender_msgs: usize,
        /// Messages timed one at a time across replicas
        #[arg(long, default_value_t = 500)]
        pings: usize,
    },
    /// One broadcast to N peers, and one event to N stream watchers
    Fanout {
        #[arg(long, default_value_t = 100)]
        receivers: usize,
        #[arg(long, default_value_t = 20)]
        rounds: usize,
    },
    /// An agent's MCP server: push latency from `mesh send` on another daemon, start to ready, idle cost
    Mcp {
        #[arg(long, default_value_t = 200)]
        messages: usize,
        /// How long the idle server is watched (seconds)
        #[arg(long, default_value = "60s", value_parser = humantime_like)]
        idle: Duration,
    },
    /// Webhooks: send to verified request at a local endpoint, deliveries per second to 1 and 10
    /// endpoints, inbox accept latency while one endpoint hangs
    Webhook {
        #[arg(long, default_value_t = 200)]
        messages: usize,
        /// Messages per sustained burst
        #[arg(long, default_value_t = 500)]
        burst: usize,
    },
    /// Every scenario, small: seconds, for CI (no timing is judged)
    Smoke,
}

#[derive(clap::Args, Debug, Clone, Copy)]
struct StoreArgs {
    /// Where the brokers keep their state
    #[arg(long, value_enum, default_value = "sqlite")]
    store: procs::Store,
    /// Broker replicas on one PostgreSQL database, peers spread over them
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(1..=16))]
    replicas: u64,
}

impl StoreArgs {
    fn setup(self, tls: bool) -> procs::Setup {
        procs::Setup { tls, store: self.store, replicas: self.replicas as usize }
    }
}

fn humantime_like(s: &str) -> Result<Duration, String> {
    let secs = s.strip_suffix('s').unwrap_or(s);
    secs.parse::<u64>().map(Duration::from_secs).map_err(|e| format!("{s}: {e} (use seconds, e.g. 900s)"))
}

fn print(json: bool, v: &serde_json::Value) {
    if json {
        println!("{v}");
        return;
    }
    let scenario = v["scenario"].as_str().unwrap_or("?");
    println!("{scenario}");
    if let Some(map) = v.as_object() {
        for (k, val) in map {
            if k != "scenario" {
                println!("  {k:<20} {val}");
            }
        }
    }
}

/// What TLS costs: the rate over `wss://` against `ws://` in the same run (and latencies where the
/// scenario has them). Target: within 15 %.
fn tls_cost(plain: &serde_json::Value, over_tls: &serde_json::Value) -> serde_json::Value {
    let rate = |v: &serde_json::Value| v["msgs_per_s"].as_f64().unwrap_or(0.0);
    let ratio = rate(over_tls) / rate(plain).max(1e-9);
    let mut cost = serde_json::json!({
        "scenario": "tls_cost",
        "of": plain["scenario"],
        "ws_msgs_per_s": rate(plain),
        "wss_msgs_per_s": rate(over_tls),
        "wss_to_ws": stats::r3(ratio),
        "cost_pct": stats::r3((1.0 - ratio) * 100.0),
        "within_15_pct": ratio >= 0.85,
    });
    if let (Some(a), Some(b)) = (plain["p50_ms"].as_f64(), over_tls["p50_ms"].as_f64()) {
        cost["ws_p50_ms"] = a.into();
        cost["wss_p50_ms"] = b.into();
        cost["ws_p99_ms"] = plain["p99_ms"].clone();
        cost["wss_p99_ms"] = over_tls["p99_ms"].clone();
    }
    cost
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bin = procs::mesh_bin(cli.mesh_bin)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let timeout = Duration::from_secs(120);
    let results = rt.block_on(async {
        anyhow::Ok(match cli.scenario {
            Scenario::Send { runs } => vec![send::run(&bin, runs).await?],
            Scenario::Load { peers, msgs, rate, timeout, tls, store } => {
                let plain = load::run(&bin, peers, msgs, rate, timeout, store.setup(false)).await?;
                if tls {
                    let over_tls = load::run(&bin, peers, msgs, rate, timeout, store.setup(true)).await?;
                    let cost = tls_cost(&plain, &over_tls);
                    vec![plain, over_tls, cost]
                } else {
                    vec![plain]
                }
            }
            Scenario::Throughput { senders, msgs, body_bytes, no_nats, tls, store } => {
                let p = throughput::Params {
                    senders,
                    msgs,
                    body_bytes,
                    timeout,
                    nats: !no_nats,
                    setup: store.setup(false),
                };
                let plain = throughput::run(&bin, p).await?;
                if tls {
                    let p = throughput::Params {
                        senders,
                        msgs,
                        body_bytes,
                        timeout,
                        nats: false,
                        setup: store.setup(true),
                    };
                    let over_tls = throughput::run(&bin, p).await?;
                    let cost = tls_cost(&plain, &over_tls);
                    vec![plain, over_tls, cost]
                } else {
                    vec![plain]
                }
            }
            Scenario::Replicas { peers, msgs, senders, sender_msgs, pings } => {
                replicas::run(&bin, replicas::Params { peers, msgs, senders, sender_msgs, pings }).await?
            }
            Scenario::Fanout { receivers, rounds } => vec![
                fanout::broadcast(&bin, receivers, rounds, timeout).await?,
                fanout::sse(&bin, receivers.min(64), rounds, timeout).await?,
            ],
            Scenario::Mcp { messages, idle } => vec![mcp::run(&bin, messages, idle).await?],
            Scenario::Webhook { messages, burst } => vec![webhook::run(&bin, messages, burst).await?],
            Scenario::Smoke => {
                let nats = std::process::Command::new("nats-server").arg("--version").output().is_ok();
                let mut all = vec![
                    send::run(&bin, 5).await?,
                    load::run(&bin, 3, 5, None, timeout, procs::Setup::plain()).await?,
                    load::run(&bin, 3, 5, Some(100.0), timeout, procs::Setup::plain()).await?,
                    load::run(&bin, 3, 5, None, timeout, procs::Setup::tls()).await?,
                    throughput::run(
                        &bin,
                        throughput::Params {
                            senders: 1,
                            msgs: 50,
                            body_bytes: 64,
                            timeout,
                            nats,
                            setup: procs::Setup::plain(),
                        },
                    )
                    .await?,
                    throughput::run(
                        &bin,
                        throughput::Params {
                            senders: 1,
                            msgs: 50,
                            body_bytes: 64,
                            timeout,
                            nats: false,
                            setup: procs::Setup::tls(),
                        },
                    )
                    .await?,
                    fanout::broadcast(&bin, 3, 2, timeout).await?,
                    fanout::sse(&bin, 2, 2, timeout).await?,
                    mcp::run(&bin, 3, Duration::from_secs(1)).await?,
                    webhook::run(&bin, 3, 5).await?,
                ];
                // Two replicas on PostgreSQL, when its server programs are here (always under CI).
                if mesh_testkit::postgres::bindir().is_some() || std::env::var_os("CI").is_some() {
                    let replicas = procs::Setup { tls: false, store: procs::Store::Postgres, replicas: 2 };
                    all.push(load::run(&bin, 4, 5, None, timeout, replicas).await?);
                    let p = throughput::Params {
                        senders: 1,
                        msgs: 50,
                        body_bytes: 64,
                        timeout,
                        nats: false,
                        setup: replicas,
                    };
                    all.push(throughput::run(&bin, p).await?);
                    all.push(replicas::wake_up(&bin, 2, 5).await?);
                } else {
                    eprintln!("skipped: the PostgreSQL runs of the smoke (no initdb here; apt-get install postgresql)");
                }
                all
            }
        })
    })?;
    for r in &results {
        print(cli.json, r);
    }
    Ok(())
}
