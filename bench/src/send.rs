//! `send`: `mesh send` as a whole CLI process against a warm daemon, and the daemon's accept path
//! (an IPC request → committed outbox row → answer): alone, on a daemon done with the previous message
//! (each one is waited for until delivered, outside the clock), and back to back, while the previous
//! messages are still being drained, delivered and decrypted by the same daemon.

use std::time::Instant;

use mesh_ipc::api::{SendRequest, SendResponse, WaitFor, WaitQuery, WaitResponse};
use mesh_ipc::{IpcClient, routes};
use serde_json::json;

use crate::procs::Daemon;
use crate::stats::{Latencies, r3};

pub async fn run(bin: &std::path::Path, runs: usize) -> anyhow::Result<serde_json::Value> {
    let daemon = Daemon::start(bin, "sender")?;
    let client = IpcClient::new(&daemon.paths());
    let send = |i: usize| SendRequest {
        client_message_id: uuid::Uuid::now_v7().to_string(),
        to: "sender".into(),
        body: format!("accept path {i}"),
        mesh: None,
    };
    for i in 0..20 {
        let _: SendResponse = client.post(routes::SEND, &send(i)).await?;
    }
    let mut accept = Latencies::default();
    let settled = WaitQuery { until: WaitFor::Delivered, timeout_ms: Some(10_000) };
    for i in 0..runs {
        let req = send(i);
        let t = Instant::now();
        let sent: SendResponse = client.post(routes::SEND, &req).await?;
        accept.push(t.elapsed());
        let path = routes::with_id(routes::OUTBOX_WAIT, sent.outbox_id);
        let waited: WaitResponse = client.get_query(&path, &settled).await?;
        anyhow::ensure!(waited.reached, "message {i} was not delivered");
    }
    let mut busy = Latencies::default();
    for i in 0..runs {
        let req = send(runs + i);
        let t = Instant::now();
        let _: SendResponse = client.post(routes::SEND, &req).await?;
        busy.push(t.elapsed());
    }
    let mut cli = Latencies::default();
    for i in 0..runs {
        let body = format!("cli {i}");
        let t = Instant::now();
        let out = daemon.command(&["send", "sender", &body]).output()?;
        cli.push(t.elapsed());
        anyhow::ensure!(out.status.success(), "mesh send failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(json!({
        "scenario": "send",
        "runs": runs,
        "p50_ms": r3(cli.pct(50.0)),
        "p99_ms": r3(cli.pct(99.0)),
        "accept_p50_ms": r3(accept.pct(50.0)),
        "accept_p99_ms": r3(accept.pct(99.0)),
        "accept_busy_p50_ms": r3(busy.pct(50.0)),
        "accept_busy_p99_ms": r3(busy.pct(99.0)),
    }))
}
