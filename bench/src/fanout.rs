//! `fanout`: one broadcast to N peers (time until each has it), and one message seen by N watchers of
//! a daemon's event stream (time until each watcher gets the event).

use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use mesh_ipc::api::{EventBody, EventScope, SendRequest, SendResponse};
use mesh_ipc::events::{self, StreamItem};
use mesh_ipc::{IpcClient, routes};
use mesh_proto::Target;
use mesh_proto::message::SealKey;
use mesh_proto::wire::{Ack, ClientFrame, ServerFrame};
use serde_json::json;
use tokio::sync::{Mutex, mpsc};
use tokio_tungstenite::tungstenite::Message;

use crate::peer;
use crate::procs::{Broker, Daemon};
use crate::stats::{Latencies, r3};

pub async fn broadcast(
    bin: &std::path::Path,
    receivers: usize,
    rounds: usize,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let broker = Broker::start(bin)?;
    let (mesh, gk, conns) = peer::mesh_of(std::slice::from_ref(&broker.endpoint), receivers + 1).await?;
    let mut conns = conns.into_iter();
    let (sender, sws) = conns.next().expect("the sender");
    let (arrivals_tx, mut arrivals) = mpsc::unbounded_channel::<Instant>();
    for (_, ws) in conns {
        let (tx, mut stream) = peer::split(ws);
        let arrivals_tx = arrivals_tx.clone();
        tokio::spawn(async move {
            while let Some(Ok(first)) = stream.next().await {
                let mut batch = vec![first];
                while let Some(Some(Ok(m))) = stream.next().now_or_never() {
                    batch.push(m);
                }
                let mut ids = vec![];
                for m in batch {
                    if let Message::Text(t) = m
                        && let Ok(ServerFrame::Deliver(d)) = mesh_proto::wire::decode_server(&t)
                    {
                        let _ = arrivals_tx.send(Instant::now());
                        ids.push(d.delivery_id);
                    }
                }
                if !ids.is_empty() && tx.send(ClientFrame::Ack(Ack { delivery_ids: ids }).to_json()).await.is_err() {
                    break;
                }
            }
        });
    }
    let (stx, mut sstream) = peer::split(sws);
    tokio::spawn(async move { while sstream.next().await.is_some() {} });
    let mut all = Latencies::default();
    let mut slowest = Latencies::default();
    let mut complete = 0;
    for round in 0..rounds {
        let cmid = format!("fanout-{round}");
        let body = "to everyone".to_owned();
        let (frame, _) = peer::send_frame(&sender, mesh, round as u64, cmid, Target::All, SealKey::Group(&gk), body);
        let t0 = Instant::now();
        stx.send(frame).await?;
        let mut got = 0;
        let deadline = tokio::time::Instant::now() + timeout;
        while got < receivers {
            match tokio::time::timeout_at(deadline, arrivals.recv()).await {
                Ok(Some(at)) => {
                    all.push(at.duration_since(t0));
                    got += 1;
                }
                _ => break,
            }
        }
        if got == receivers {
            complete += 1;
            slowest.push(t0.elapsed());
        }
    }
    Ok(json!({
        "scenario": "fanout_broadcast",
        "receivers": receivers,
        "rounds": rounds,
        "delivered_ratio": r3(all.len() as f64 / (receivers * rounds) as f64),
        "complete_rounds": complete,
        "p50_ms": r3(all.pct(50.0)),
        "p95_ms": r3(all.pct(95.0)),
        "p99_ms": r3(all.pct(99.0)),
        "all_reached_p50_ms": r3(slowest.pct(50.0)),
        "all_reached_max_ms": r3(slowest.max()),
    }))
}

pub async fn sse(
    bin: &std::path::Path,
    watchers: usize,
    rounds: usize,
    timeout: Duration,
) -> anyhow::Result<serde_json::Value> {
    let daemon = Daemon::start(bin, "fanout")?;
    let home = daemon.paths();
    let token = std::fs::read_to_string(home.member_token_path())?.trim().to_owned();
    let (seen_tx, mut seen) = mpsc::unbounded_channel::<(String, Instant)>();
    let (ready_tx, mut ready) = mpsc::unbounded_channel::<()>();
    for _ in 0..watchers {
        let stream =
            events::follow(home.socket_path(), &token, EventScope::Own, None, true).map_err(anyhow::Error::msg)?;
        let (seen_tx, ready_tx) = (seen_tx.clone(), ready_tx.clone());
        tokio::spawn(async move {
            let mut stream = std::pin::pin!(stream);
            while let Some(item) = stream.next().await {
                match item {
                    StreamItem::Connected => {
                        let _ = ready_tx.send(());
                    }
                    StreamItem::Event(e) => {
                        if let EventBody::Message(m) = e.body
                            && let Some(b) = m.body
                        {
                            let _ = seen_tx.send((b, Instant::now()));
                        }
                    }
                    _ => {}
                }
            }
        });
    }
    for _ in 0..watchers {
        tokio::time::timeout(timeout, ready.recv()).await?;
    }
    let client = IpcClient::new(&home);
    let all = Arc::new(Mutex::new(Latencies::default()));
    let mut delivered = 0;
    for round in 0..rounds {
        let body = format!("watched {round}");
        let req = SendRequest {
            client_message_id: uuid::Uuid::now_v7().to_string(),
            to: "fanout".into(),
            body: body.clone(),
            mesh: None,
        };
        let t0 = Instant::now();
        let _: SendResponse = client.post(routes::SEND, &req).await?;
        let mut got = 0;
        let deadline = tokio::time::Instant::now() + timeout;
        while got < watchers {
            match tokio::time::timeout_at(deadline, seen.recv()).await {
                Ok(Some((b, at))) if b == body => {
                    all.lock().await.push(at.duration_since(t0));
                    got += 1;
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        delivered += got;
    }
    let all = all.lock().await.clone();
    Ok(json!({
        "scenario": "fanout_sse",
        "watchers": watchers,
        "rounds": rounds,
        "delivered_ratio": r3(delivered as f64 / (watchers * rounds) as f64),
        "p50_ms": r3(all.pct(50.0)),
        "p95_ms": r3(all.pct(95.0)),
        "p99_ms": r3(all.pct(99.0)),
    }))
}
