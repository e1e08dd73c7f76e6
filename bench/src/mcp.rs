//! `mcp`: an agent's MCP server. From `mesh send` on one daemon (the CLI as a process) to the
//! channel notification read from `mesh mcp` of a session on another daemon, through a broker; the
//! server's start to its `initialize` answer; its resident memory and CPU while idle.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

use crate::procs::{Broker, Daemon, cpu_seconds};
use crate::stats::{Latencies, r3};

pub async fn run(bin: &std::path::Path, messages: usize, idle: Duration) -> anyhow::Result<Value> {
    let broker = Broker::start(bin)?;
    let (alice, bob) = (Daemon::start(bin, "alice")?, Daemon::start(bin, "bob")?);
    alice.run(&["create", "team", "--broker", &broker.url])?;
    let token = alice.run(&["invite", "--mesh", "team", "--uses", "0"])?;
    bob.run(&["join", token.trim()])?;

    let started = Instant::now();
    let mut server = tokio::process::Command::new(bin)
        .args(["mcp", "--name", "worker", "--mesh", "team"])
        .env("MESH_HOME", bob.home.path())
        .env_remove("MESH_SESSION_FILE")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("starting mesh mcp")?;
    let pid = server.id().context("pid")?;
    let mut stdin = server.stdin.take().context("stdin")?;
    let mut lines = BufReader::new(server.stdout.take().context("stdout")?).lines();
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "mesh-bench", "version": "0"}}});
    stdin.write_all(format!("{initialize}\n").as_bytes()).await?;
    let answer = next_line(&mut lines).await?;
    let ready_ms = started.elapsed().as_secs_f64() * 1000.0;
    anyhow::ensure!(answer["id"] == 1 && answer["result"].is_object(), "initialize answered {answer}");
    stdin.write_all(b"{\"jsonrpc\":\"2.0\",\"method\":\"notifications/initialized\"}\n").await?;

    // The session is online before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let list: Value = serde_json::from_str(&bob.run(&["session", "list", "--json"])?)?;
        let online = list
            .as_array()
            .is_some_and(|a| a.iter().any(|s| s["name"] == "worker" && s["connection"]["state"] == "online"));
        if online {
            break;
        }
        if Instant::now() > deadline {
            bail!("the worker session did not come online");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut push = Latencies::default();
    for i in 0..messages {
        let body = format!("push {i}");
        let t = Instant::now();
        let out = alice.command(&["send", "--mesh", "team", "worker", &body]).output()?;
        anyhow::ensure!(out.status.success(), "mesh send: {}", String::from_utf8_lossy(&out.stderr));
        loop {
            let note = next_line(&mut lines).await?;
            if note["method"] == "notifications/claude/channel" && note["params"]["content"] == body.as_str() {
                break;
            }
        }
        push.push(t.elapsed());
    }

    let cpu_before = cpu_seconds(pid).unwrap_or(0.0);
    tokio::time::sleep(idle).await;
    let cpu_idle = cpu_seconds(pid).unwrap_or(0.0) - cpu_before;
    let rss_mb = current_rss_mb(pid).unwrap_or(0.0);
    drop(stdin);
    let _ = server.kill().await;
    Ok(json!({
        "scenario": "mcp",
        "messages": messages,
        // Push latency: `mesh send` on alice's daemon to the notification read from bob's server.
        "p50_ms": r3(push.pct(50.0)),
        "p99_ms": r3(push.pct(99.0)),
        "delivered_ratio": push.len() as f64 / messages.max(1) as f64,
        "ready_ms": r3(ready_ms),
        "idle_secs": idle.as_secs(),
        "idle_rss_mb": r3(rss_mb),
        "idle_cpu_s": r3(cpu_idle),
    }))
}

/// The next JSON line the server writes, within 30 s.
async fn next_line(lines: &mut tokio::io::Lines<BufReader<tokio::process::ChildStdout>>) -> anyhow::Result<Value> {
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .context("mesh mcp said nothing for 30 s")??
        .context("mesh mcp closed its output")?;
    serde_json::from_str(&line).with_context(|| format!("not JSON-RPC on stdout: {line:?}"))
}

/// Resident memory (VmRSS) now, in MB.
fn current_rss_mb(pid: u32) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kb: f64 = status.lines().find(|l| l.starts_with("VmRSS:"))?.split_whitespace().nth(1)?.parse().ok()?;
    Some(kb / 1024.0)
}
