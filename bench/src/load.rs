//! `load --peers N --msgs M`: N peers on one broker (or spread over replicas), each sending M
//! encrypted DMs to random peers
//! (the shape of claudemesh's published load test). Reports the delivered ratio, end-to-end and
//! send→accept latencies, throughput and the broker's peak RSS.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{FutureExt, StreamExt};
use mesh_proto::message::SealKey;
use mesh_proto::wire::{Ack, ClientFrame, DeliveryItem, ServerFrame};
use mesh_proto::{EncPublicKey, PublicKey, Target};
use rand::Rng;
use serde_json::json;
use tokio::sync::{Mutex, Notify, Semaphore};
use tokio_tungstenite::tungstenite::Message;

use crate::peer;
use crate::procs::{Brokers, Setup};
use crate::stats::{Latencies, r3};

/// Sends in flight per peer.
const WINDOW: usize = 64;

struct Shared {
    base: Instant,
    /// When each message was written to the socket, in µs since `base` (0: not yet), by peer and index.
    sent_us: Vec<Vec<AtomicU64>>,
    expected: usize,
    received: AtomicUsize,
    errors: AtomicUsize,
    e2e: Mutex<Latencies>,
    accept: Mutex<Latencies>,
    last: Mutex<Option<Instant>>,
    all_in: Notify,
}

/// `rate`: messages per second offered by all peers together, evenly spread (open loop: a peer that
/// falls behind catches up); `None` sends as fast as each peer's window allows (saturation).
pub async fn run(
    bin: &std::path::Path,
    peers: usize,
    msgs: usize,
    rate: Option<f64>,
    timeout: Duration,
    setup: Setup,
) -> anyhow::Result<serde_json::Value> {
    let brokers = Brokers::start(bin, setup.store, setup.replicas, setup.tls)?;
    let (mesh, _gk, conns) = peer::mesh_of(&brokers.endpoints(), peers.max(2)).await?;
    let directory: Arc<Vec<(PublicKey, EncPublicKey)>> =
        Arc::new(conns.iter().map(|(id, _)| (id.key(), id.enc_key())).collect());
    // Every message is sealed before the clock starts: the load generator shares the machine with the
    // broker, and its crypto is not what is measured.
    let frames = seal_all(mesh, &conns, &directory, msgs).await?;
    let shared = Arc::new(Shared {
        base: Instant::now(),
        sent_us: (0..conns.len()).map(|_| (0..msgs).map(|_| AtomicU64::new(0)).collect()).collect(),
        expected: conns.len() * msgs,
        received: AtomicUsize::new(0),
        errors: AtomicUsize::new(0),
        e2e: Mutex::default(),
        accept: Mutex::default(),
        last: Mutex::new(None),
        all_in: Notify::new(),
    });
    let cpu_before = brokers.cpu_seconds();
    let start = Instant::now();
    for (index, ((_, ws), frames)) in conns.into_iter().zip(frames).enumerate() {
        let (tx, mut stream) = peer::split(ws);
        let window = Arc::new(Semaphore::new(WINDOW));
        // Reader: accepts, deliveries (acked in batches), receipts.
        {
            let (shared, tx, window) = (shared.clone(), tx.clone(), window.clone());
            tokio::spawn(async move {
                while let Some(Ok(first)) = stream.next().await {
                    let mut batch = vec![first];
                    while let Some(Some(Ok(m))) = stream.next().now_or_never() {
                        batch.push(m);
                    }
                    let mut acks = Vec::new();
                    for m in batch {
                        let Message::Text(text) = m else { continue };
                        match mesh_proto::wire::decode_server(&text) {
                            Ok(ServerFrame::Accepted(a)) => {
                                if let Some(sent) = shared.sent_us[index].get(a.id as usize) {
                                    let now_us = shared.base.elapsed().as_micros() as u64;
                                    let took = now_us.saturating_sub(sent.load(Ordering::Relaxed));
                                    shared.accept.lock().await.push(Duration::from_micros(took));
                                }
                                window.add_permits(1);
                            }
                            Ok(ServerFrame::Error(_)) => {
                                shared.errors.fetch_add(1, Ordering::Relaxed);
                                window.add_permits(1);
                            }
                            Ok(ServerFrame::Deliver(d)) => {
                                acks.push(d.delivery_id);
                                if let DeliveryItem::Message(env) = d.item {
                                    let sent_us = sent_time(&shared, &env.client_message_id);
                                    let now_us = shared.base.elapsed().as_micros() as u64;
                                    shared.e2e.lock().await.push(Duration::from_micros(now_us.saturating_sub(sent_us)));
                                    *shared.last.lock().await = Some(Instant::now());
                                    if shared.received.fetch_add(1, Ordering::Relaxed) + 1 == shared.expected {
                                        shared.all_in.notify_one();
                                    }
                                }
                            }
                            _ => {}
                        }
                    }
                    if !acks.is_empty()
                        && tx.send(ClientFrame::Ack(Ack { delivery_ids: acks }).to_json()).await.is_err()
                    {
                        break;
                    }
                }
            });
        }
        // Sender.
        let shared = shared.clone();
        let npeers = shared.sent_us.len();
        let mut ticker = rate.map(|rate| {
            let period = Duration::from_secs_f64(npeers as f64 / rate);
            // Peers start spread over one period, so the offered load is even.
            let phase = period.mul_f64(index as f64 / npeers as f64);
            tokio::time::interval_at(tokio::time::Instant::now() + phase, period)
        });
        tokio::spawn(async move {
            for (m, frame) in frames.into_iter().enumerate() {
                if let Some(ticker) = ticker.as_mut() {
                    ticker.tick().await;
                }
                let Ok(permit) = window.acquire().await else { return };
                permit.forget();
                shared.sent_us[index][m].store(shared.base.elapsed().as_micros() as u64, Ordering::Relaxed);
                if tx.send(frame).await.is_err() {
                    return;
                }
            }
        });
    }
    let finished = tokio::time::timeout(timeout, shared.all_in.notified()).await.is_ok();
    let received = shared.received.load(Ordering::Relaxed);
    let elapsed = shared.last.lock().await.map_or(start.elapsed(), |t| t.duration_since(start));
    let e2e = shared.e2e.lock().await.clone();
    let accept = shared.accept.lock().await.clone();
    Ok(json!({
        "scenario": "load",
        "transport": if setup.tls { "wss" } else { "ws" },
        "store": setup.store.as_str(),
        "replicas": brokers.all.len(),
        "peers": directory.len(),
        "msgs": msgs,
        "offered_per_s": rate,
        "expected": shared.expected,
        "delivered": received,
        "delivered_ratio": r3(received as f64 / shared.expected as f64),
        "completed": finished,
        "errors": shared.errors.load(Ordering::Relaxed),
        "p50_ms": r3(e2e.pct(50.0)),
        "p95_ms": r3(e2e.pct(95.0)),
        "p99_ms": r3(e2e.pct(99.0)),
        "max_ms": r3(e2e.max()),
        "accept_p50_ms": r3(accept.pct(50.0)),
        "accept_p99_ms": r3(accept.pct(99.0)),
        "msgs_per_s": r3(received as f64 / elapsed.as_secs_f64().max(1e-9)),
        "seconds": r3(elapsed.as_secs_f64()),
        "peak_rss_mb": brokers.peak_rss_mb().map(r3),
        "broker_cpu_s": brokers.cpu_seconds().zip(cpu_before).map(|(after, before)| r3(after - before)),
    }))
}

/// The send time of the message whose client_message_id is `p<peer>-<index>`.
fn sent_time(shared: &Shared, cmid: &str) -> u64 {
    let parsed = cmid
        .strip_prefix('p')
        .and_then(|rest| rest.split_once('-'))
        .and_then(|(p, m)| Some((p.parse::<usize>().ok()?, m.parse::<usize>().ok()?)));
    parsed.and_then(|(p, m)| shared.sent_us.get(p)?.get(m)).map_or(0, |t| t.load(Ordering::Relaxed))
}

/// Each peer's `msgs` sends, to random other peers, sealed and serialised; on the blocking pool, one
/// task per peer.
async fn seal_all(
    mesh: mesh_proto::MeshId,
    conns: &[(mesh_proto::Identity, peer::Ws)],
    directory: &Arc<Vec<(PublicKey, EncPublicKey)>>,
    msgs: usize,
) -> anyhow::Result<Vec<Vec<String>>> {
    let mut tasks = Vec::new();
    for (index, (id, _)) in conns.iter().enumerate() {
        let (id, directory) = (id.clone(), directory.clone());
        tasks.push(tokio::task::spawn_blocking(move || {
            let mut rng = rand::thread_rng();
            (0..msgs)
                .map(|m| {
                    let to = loop {
                        let r = rng.gen_range(0..directory.len());
                        if r != index {
                            break r;
                        }
                    };
                    let (key, enc) = directory[to];
                    let body = format!("load message {m} from peer {index}");
                    let cmid = format!("p{index}-{m}");
                    peer::send_frame(&id, mesh, m as u64, cmid, Target::Key(key), SealKey::Direct(&enc), body).0
                })
                .collect::<Vec<String>>()
        }));
    }
    let mut frames = Vec::with_capacity(tasks.len());
    for t in tasks {
        frames.push(t.await?);
    }
    Ok(frames)
}
