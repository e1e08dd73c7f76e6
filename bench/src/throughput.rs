//! `throughput`: the broker's sustained durable rate (sends committed to recipient queues and
//! delivered), and in the same run NATS JetStream (file storage, acked publishes) with the same
//! payload size and concurrency, as the reference.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::stream::FuturesUnordered;
use futures_util::{FutureExt, StreamExt};
use mesh_proto::Target;
use mesh_proto::message::SealKey;
use mesh_proto::wire::{Ack, ClientFrame, ServerFrame};
use serde_json::json;
use tokio::sync::{Notify, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::peer;
use crate::procs::{Brokers, Nats, Setup};
use crate::stats::r3;

const WINDOW: usize = 256;

pub struct Params {
    pub senders: usize,
    pub msgs: usize,
    pub body_bytes: usize,
    pub timeout: Duration,
    pub nats: bool,
    pub setup: Setup,
}

pub async fn run(bin: &std::path::Path, p: Params) -> anyhow::Result<serde_json::Value> {
    let mesh_result = mesh(bin, &p).await?;
    let nats_result = if p.nats { Some(nats(&p, mesh_result.payload).await?) } else { None };
    let MeshRun { accepted_per_s, delivered_per_s, payload, rss, broker_cpu_s } = mesh_result;
    Ok(json!({
        "scenario": "throughput",
        "transport": if p.setup.tls { "wss" } else { "ws" },
        "store": p.setup.store.as_str(),
        "replicas": p.setup.replicas,
        "senders": p.senders,
        "msgs": p.msgs * p.senders,
        "payload_bytes": payload,
        "msgs_per_s": r3(accepted_per_s),
        "delivered_per_s": r3(delivered_per_s),
        "nats_msgs_per_s": nats_result.map(r3),
        "ratio_to_nats": nats_result.map(|n| r3(accepted_per_s / n)),
        "peak_rss_mb": rss.map(r3),
        "broker_cpu_s": broker_cpu_s.map(r3),
        "msgs_per_broker_cpu_s": broker_cpu_s.map(|cpu| r3((p.msgs * p.senders) as f64 / cpu.max(1e-9))),
    }))
}

struct MeshRun {
    accepted_per_s: f64,
    delivered_per_s: f64,
    /// Ciphertext bytes of one message.
    payload: usize,
    rss: Option<f64>,
    /// CPU the broker spent from the first send to the last delivery.
    broker_cpu_s: Option<f64>,
}

async fn mesh(bin: &std::path::Path, p: &Params) -> anyhow::Result<MeshRun> {
    let brokers = Brokers::start(bin, p.setup.store, p.setup.replicas, p.setup.tls)?;
    // Senders and recipients alternate, so with replicas every message crosses from one to another.
    let (mesh, _gk, conns) = peer::mesh_of(&brokers.endpoints(), p.senders * 2).await?;
    let mut conns = conns.into_iter();
    let total = p.senders * p.msgs;
    let accepted = Arc::new(AtomicUsize::new(0));
    let delivered = Arc::new(AtomicUsize::new(0));
    let (all_accepted, all_delivered) = (Arc::new(Notify::new()), Arc::new(Notify::new()));
    let body = "x".repeat(p.body_bytes);
    let mut payload = 0;
    let mut senders = Vec::new();
    for k in 0..p.senders {
        let (sender, sws) = conns.next().expect("a sender");
        let (recipient, rws) = conns.next().expect("a recipient");
        // Sealed before the clock starts: this measures the broker, not the benchmark's crypto.
        let target = Target::Key(recipient.key());
        let frames: Vec<String> = (0..p.msgs)
            .map(|m| {
                let cmid = format!("t{k}-{m}");
                let enc = recipient.enc_key();
                let (frame, size) = peer::send_frame(
                    &sender,
                    mesh,
                    m as u64,
                    cmid,
                    target.clone(),
                    SealKey::Direct(&enc),
                    body.clone(),
                );
                payload = size;
                frame
            })
            .collect();
        // The recipient acks everything it gets.
        let (rtx, mut rstream) = peer::split(rws);
        let (delivered, all_delivered) = (delivered.clone(), all_delivered.clone());
        tokio::spawn(async move {
            while let Some(Ok(first)) = rstream.next().await {
                let mut batch = vec![first];
                while let Some(Some(Ok(m))) = rstream.next().now_or_never() {
                    batch.push(m);
                }
                let ids: Vec<u64> = batch
                    .iter()
                    .filter_map(|m| match m {
                        Message::Text(t) => match mesh_proto::wire::decode_server(t) {
                            Ok(ServerFrame::Deliver(d)) => Some(d.delivery_id),
                            _ => None,
                        },
                        _ => None,
                    })
                    .collect();
                if ids.is_empty() {
                    continue;
                }
                if delivered.fetch_add(ids.len(), Ordering::Relaxed) + ids.len() >= total {
                    all_delivered.notify_one();
                }
                if rtx.send(ClientFrame::Ack(Ack { delivery_ids: ids }).to_json()).await.is_err() {
                    break;
                }
            }
        });
        senders.push((sws, frames));
    }
    let cpu_before = brokers.cpu_seconds();
    let start = Instant::now();
    for (sws, frames) in senders {
        let (tx, mut stream) = peer::split(sws);
        let window = Arc::new(Semaphore::new(WINDOW));
        {
            let (window, accepted, all_accepted) = (window.clone(), accepted.clone(), all_accepted.clone());
            tokio::spawn(async move {
                while let Some(Ok(m)) = stream.next().await {
                    if let Message::Text(t) = m
                        && t.starts_with(r#"{"type":"accepted""#)
                    {
                        window.add_permits(1);
                        if accepted.fetch_add(1, Ordering::Relaxed) + 1 >= total {
                            all_accepted.notify_one();
                        }
                    }
                }
            });
        }
        tokio::spawn(async move {
            for f in frames {
                let Ok(permit) = window.acquire().await else { return };
                permit.forget();
                if tx.send(f).await.is_err() {
                    return;
                }
            }
        });
    }
    let _ = tokio::time::timeout(p.timeout, all_accepted.notified()).await;
    let accepted_s = accepted.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let _ = tokio::time::timeout(p.timeout, all_delivered.notified()).await;
    let delivered_s = delivered.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64();
    let broker_cpu_s = brokers.cpu_seconds().zip(cpu_before).map(|(after, before)| after - before);
    Ok(MeshRun {
        accepted_per_s: accepted_s,
        delivered_per_s: delivered_s,
        payload,
        rss: brokers.peak_rss_mb(),
        broker_cpu_s,
    })
}

/// JetStream acked publishes of `payload` bytes, same concurrency and window. Returns acks/s.
async fn nats(p: &Params, payload: usize) -> anyhow::Result<f64> {
    use async_nats::jetstream;
    let server = Nats::start()?;
    let client = {
        let mut attempt = 0;
        loop {
            match async_nats::connect(&server.url).await {
                Ok(c) => break c,
                Err(e) if attempt < 100 => {
                    attempt += 1;
                    // nats-server takes a moment to listen; connect refused until then.
                    tokio::time::sleep(Duration::from_millis(20)).await;
                    let _ = e;
                }
                Err(e) => return Err(e.into()),
            }
        }
    };
    let js = jetstream::new(client.clone());
    js.get_or_create_stream(jetstream::stream::Config {
        name: "BENCH".into(),
        subjects: vec!["bench.>".into()],
        storage: jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await?;
    let data = bytes_of(payload);
    let start = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for k in 0..p.senders {
        let js = jetstream::new(client.clone());
        let data = data.clone();
        let msgs = p.msgs;
        tasks.spawn(async move {
            let mut inflight = FuturesUnordered::new();
            for _ in 0..msgs {
                if inflight.len() >= WINDOW
                    && let Some(ack) = inflight.next().await
                {
                    ack?;
                }
                let ack = js.publish(format!("bench.{k}"), data.clone()).await?.into_future();
                inflight.push(ack);
            }
            while let Some(ack) = inflight.next().await {
                ack?;
            }
            anyhow::Ok(())
        });
    }
    while let Some(r) = tasks.join_next().await {
        r??;
    }
    Ok((p.senders * p.msgs) as f64 / start.elapsed().as_secs_f64())
}

fn bytes_of(n: usize) -> bytes::Bytes {
    bytes::Bytes::from(vec![0x61; n])
}
