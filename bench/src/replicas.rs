//! `replicas`: the broker on SQLite, on PostgreSQL with one replica and with three, in one run
//! (throughput and load on each); the wake-up latency from a send on one replica to its delivery by
//! another; and how soon a recipient's messages flow again after its replica is killed.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use mesh_proto::message::SealKey;
use mesh_proto::wire::{Ack, ClientFrame, DeliveryItem, Intent, ServerFrame};
use mesh_proto::{Identity, MeshId, Target};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

use crate::peer::{self, Ws};
use crate::procs::{Brokers, Setup, Store};
use crate::stats::{Latencies, r3};
use crate::{load, throughput};

pub struct Params {
    pub peers: usize,
    pub msgs: usize,
    pub senders: usize,
    pub sender_msgs: usize,
    pub pings: usize,
}

const TIMEOUT: Duration = Duration::from_secs(900);

pub async fn run(bin: &std::path::Path, p: Params) -> anyhow::Result<Vec<serde_json::Value>> {
    let setups = [
        Setup { tls: false, store: Store::Sqlite, replicas: 1 },
        Setup { tls: false, store: Store::Postgres, replicas: 1 },
        Setup { tls: false, store: Store::Postgres, replicas: 3 },
    ];
    let mut out = Vec::new();
    for setup in setups {
        let params = throughput::Params {
            senders: p.senders,
            msgs: p.sender_msgs,
            body_bytes: 256,
            timeout: TIMEOUT,
            nats: false,
            setup,
        };
        out.push(throughput::run(bin, params).await?);
    }
    for setup in setups {
        out.push(load::run(bin, p.peers, p.msgs, None, TIMEOUT, setup).await?);
    }
    out.push(wake_up(bin, 1, p.pings).await?);
    out.push(wake_up(bin, 2, p.pings).await?);
    out.push(failover(bin).await?);
    Ok(out)
}

/// Sends `n` messages one at a time from a peer on the first replica to a peer on the last, idle
/// between them: each delivery is a wake-up from the accepting replica to the delivering one (with
/// one replica: within it, for comparison).
pub async fn wake_up(bin: &std::path::Path, replicas: usize, n: usize) -> anyhow::Result<serde_json::Value> {
    let brokers = Brokers::start(bin, Store::Postgres, replicas, false)?;
    let (mesh, _gk, conns) = peer::mesh_of(&brokers.endpoints(), 2).await?;
    let mut conns = conns.into_iter();
    let (sender, mut sws) = conns.next().context("sender")?;
    let (recipient, mut rws) = conns.next().context("recipient")?;
    let mut latencies = Latencies::default();
    for i in 0..n {
        let frame = dm(mesh, &sender, &recipient, &format!("ping-{i}"), i as u64);
        // Quiet between messages: each one finds the recipient's connection idle.
        tokio::time::sleep(Duration::from_millis(2)).await;
        let sent = Instant::now();
        sws.send(Message::Text(frame.into())).await?;
        let delivery = next_delivery(&mut rws).await?;
        latencies.push(sent.elapsed());
        rws.send(Message::Text(ClientFrame::Ack(Ack { delivery_ids: vec![delivery] }).to_json().into())).await?;
        drain_own(&mut sws).await;
    }
    Ok(json!({
        "scenario": "wake_up",
        "store": "postgres",
        "replicas": replicas,
        "across_replicas": replicas > 1,
        "messages": n,
        // Each message is delivered before the next is sent (or the run fails).
        "delivered_ratio": 1.0,
        "p50_ms": r3(latencies.pct(50.0)),
        "p99_ms": r3(latencies.pct(99.0)),
        "max_ms": r3(latencies.max()),
    }))
}

/// A recipient on replica B holds unacked deliveries; B is killed (SIGKILL); the recipient connects to
/// replica A at once. How long until a message sent after the kill reaches it, and until the items
/// B had leased to it are delivered again.
async fn failover(bin: &std::path::Path) -> anyhow::Result<serde_json::Value> {
    let mut brokers = Brokers::start(bin, Store::Postgres, 2, false)?;
    let endpoints = brokers.endpoints();
    let (mesh, _gk, conns) = peer::mesh_of(&endpoints, 2).await?;
    let mut conns = conns.into_iter();
    let (sender, mut sws) = conns.next().context("sender")?;
    let (recipient, mut rws) = conns.next().context("recipient")?;
    const HELD: usize = 10;
    for i in 0..HELD {
        sws.send(Message::Text(dm(mesh, &sender, &recipient, &format!("held-{i}"), i as u64).into())).await?;
    }
    for _ in 0..HELD {
        // Taken, never acked: leased by replica B.
        next_delivery(&mut rws).await?;
    }
    let killed = Instant::now();
    brokers.all[1].kill9();
    drop(rws);
    let (mut again, _) = peer::connect(&endpoints[0], mesh, &recipient, "peer-1", |_| Intent::Connect).await?;
    let reconnected = killed.elapsed();
    sws.send(Message::Text(dm(mesh, &sender, &recipient, "after", 100).into())).await?;
    let (mut first_new, mut held_back) = (None, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    while first_new.is_none() || held_back < HELD {
        if Instant::now() > deadline {
            bail!("failover: after 120 s, new message {first_new:?}, {held_back} of {HELD} held items back");
        }
        let Some((delivery, cmid)) = next_message(&mut again).await? else { continue };
        if cmid == "after" {
            first_new.get_or_insert(killed.elapsed());
        } else if cmid.starts_with("held-") {
            held_back += 1;
        }
        again.send(Message::Text(ClientFrame::Ack(Ack { delivery_ids: vec![delivery] }).to_json().into())).await?;
        if held_back == HELD && first_new.is_some() {
            break;
        }
    }
    let all_back = killed.elapsed();
    Ok(json!({
        "scenario": "failover",
        "store": "postgres",
        "replicas": 2,
        "reconnected_ms": r3(reconnected.as_secs_f64() * 1000.0),
        "new_messages_flow_ms": first_new.map(|d| r3(d.as_secs_f64() * 1000.0)),
        "held_items_back_ms": r3(all_back.as_secs_f64() * 1000.0),
        "lease_s": 30,
    }))
}

fn dm(mesh: MeshId, from: &Identity, to: &Identity, cmid: &str, id: u64) -> String {
    let (target, body) = (Target::Key(to.key()), format!("bench {cmid}"));
    peer::send_frame(from, mesh, id, cmid.to_owned(), target, SealKey::Direct(&to.enc_key()), body).0
}

/// The next delivered message's delivery id (receipts and other frames skipped).
async fn next_delivery(ws: &mut Ws) -> anyhow::Result<u64> {
    loop {
        if let Some((id, _)) = next_message(ws).await? {
            return Ok(id);
        }
    }
}

/// The next frame: `Some((delivery id, client_message_id))` for a delivered message.
async fn next_message(ws: &mut Ws) -> anyhow::Result<Option<(u64, String)>> {
    let frame = tokio::time::timeout(Duration::from_secs(120), ws.next())
        .await
        .context("no frame within 120 s")?
        .context("connection closed")??;
    let Message::Text(text) = frame else { return Ok(None) };
    match mesh_proto::wire::decode_server(&text) {
        Ok(ServerFrame::Deliver(d)) => match d.item {
            DeliveryItem::Message(env) => Ok(Some((d.delivery_id, env.client_message_id))),
            _ => Ok(None),
        },
        _ => Ok(None),
    }
}

/// Reads what is waiting on the sender's socket without waiting, acking its receipts.
async fn drain_own(ws: &mut Ws) {
    let mut acks = Vec::new();
    while let Ok(Some(Ok(Message::Text(text)))) = tokio::time::timeout(Duration::ZERO, ws.next()).await {
        if let Ok(ServerFrame::Deliver(d)) = mesh_proto::wire::decode_server(&text) {
            acks.push(d.delivery_id);
        }
    }
    if !acks.is_empty() {
        let _ = ws.send(Message::Text(ClientFrame::Ack(Ack { delivery_ids: acks }).to_json().into())).await;
    }
}
