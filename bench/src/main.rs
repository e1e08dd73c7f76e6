//! `mesh-bench`: the project's benchmarks. Each scenario prints a table, or with `--json` one JSON
//! object per line whose last line is the summary (`delivered_ratio`, `p50_ms`, `p95_ms`, `p99_ms`,
//! `msgs_per_s`, `peak_rss_mb`, … as the scenario has them). Results and how they compare with the
//! targets are in `docs/benchmarks.md`.

mod fanout;
mod load;
mod mcp;
mod peer;
mod procs;
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

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let bin = procs::mesh_bin(cli.mesh_bin)?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    let timeout = Duration::from_secs(120);
    let results = rt.block_on(async {
        anyhow::Ok(match cli.scenario {
            Scenario::Send { runs } => vec![send::run(&bin, runs).await?],
            Scenario::Load { peers, msgs, rate, timeout } => vec![load::run(&bin, peers, msgs, rate, timeout).await?],
            Scenario::Throughput { senders, msgs, body_bytes, no_nats } => {
                let p = throughput::Params { senders, msgs, body_bytes, timeout, nats: !no_nats };
                vec![throughput::run(&bin, p).await?]
            }
            Scenario::Fanout { receivers, rounds } => vec![
                fanout::broadcast(&bin, receivers, rounds, timeout).await?,
                fanout::sse(&bin, receivers.min(64), rounds, timeout).await?,
            ],
            Scenario::Mcp { messages, idle } => vec![mcp::run(&bin, messages, idle).await?],
            Scenario::Webhook { messages, burst } => vec![webhook::run(&bin, messages, burst).await?],
            Scenario::Smoke => {
                let nats = std::process::Command::new("nats-server").arg("--version").output().is_ok();
                vec![
                    send::run(&bin, 5).await?,
                    load::run(&bin, 3, 5, None, timeout).await?,
                    load::run(&bin, 3, 5, Some(100.0), timeout).await?,
                    throughput::run(&bin, throughput::Params { senders: 1, msgs: 50, body_bytes: 64, timeout, nats })
                        .await?,
                    fanout::broadcast(&bin, 3, 2, timeout).await?,
                    fanout::sse(&bin, 2, 2, timeout).await?,
                    mcp::run(&bin, 3, Duration::from_secs(1)).await?,
                    webhook::run(&bin, 3, 5).await?,
                ]
            }
        })
    })?;
    for r in &results {
        print(cli.json, r);
    }
    Ok(())
}
