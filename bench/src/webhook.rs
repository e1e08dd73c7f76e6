//! `webhook`: messages POSTed to a local endpoint. From `POST /v1/send` on one daemon (IPC) to the
//! verified request at a receiver that bob's daemon posts to, through a broker; sustained deliveries
//! to one endpoint and to ten; and bob's inbox accept latency (send to filed) with no endpoint, then
//! while one endpoint never answers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use hmac::{Hmac, Mac};
use mesh_ipc::api::{InboxAckRequest, InboxAckResponse, InboxMessage, InboxQuery, SendRequest, SendResponse};
use mesh_ipc::{IpcClient, routes};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::procs::{Broker, Daemon};
use crate::stats::{Latencies, r3};

/// What the receiver verified: (endpoint, the message body in the payload, when).
type Seen = (String, String, Instant);

#[derive(Clone)]
struct Receiver {
    secrets: Arc<Mutex<HashMap<String, Vec<u8>>>>,
    seen: mpsc::UnboundedSender<Seen>,
    refused: Arc<std::sync::atomic::AtomicU64>,
}

/// Verifies a Standard Webhooks request (any of its `v1,` signatures) with the endpoint's secret.
fn verified(secret: &[u8], headers: &HeaderMap, body: &[u8]) -> bool {
    let get = |h: &str| headers.get(h).and_then(|v| v.to_str().ok()).unwrap_or_default();
    let (id, ts, sigs) = (get("webhook-id"), get("webhook-timestamp"), get("webhook-signature"));
    let Ok(mut mac) = Hmac::<sha2::Sha256>::new_from_slice(secret) else { return false };
    mac.update(format!("{id}.{ts}.").as_bytes());
    mac.update(body);
    let expected = format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()));
    sigs.split(' ').any(|s| s == expected)
}

async fn ok(
    State(r): State<Receiver>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> StatusCode {
    let at = Instant::now();
    let secret = r.secrets.lock().expect("lock").get(&name).cloned();
    if !secret.is_some_and(|s| verified(&s, &headers, &body)) {
        r.refused.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        return StatusCode::BAD_REQUEST;
    }
    let payload: Value = serde_json::from_slice(&body).unwrap_or_default();
    let text = payload["data"]["body"].as_str().unwrap_or_default().to_owned();
    let _ = r.seen.send((name, text, at));
    StatusCode::NO_CONTENT
}

async fn hang() -> StatusCode {
    std::future::pending::<()>().await;
    StatusCode::NO_CONTENT
}

pub async fn run(bin: &std::path::Path, messages: usize, burst: usize) -> anyhow::Result<Value> {
    let (tx, mut rx) = mpsc::unbounded_channel();
    let receiver =
        Receiver { secrets: Default::default(), seen: tx, refused: Arc::new(std::sync::atomic::AtomicU64::new(0)) };
    let app = axum::Router::new()
        .route("/ok/{name}", axum::routing::post(ok))
        .route("/hang/{name}", axum::routing::post(hang))
        .with_state(receiver.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let port = listener.local_addr()?.port();
    let server = tokio::spawn(async move { axum::serve(listener, app).await });

    let broker = Broker::start(bin)?;
    let (alice, bob) = (Daemon::start(bin, "alice")?, Daemon::start(bin, "bob")?);
    alice.run(&["create", "team", "--broker", &broker.url])?;
    let token = alice.run(&["invite", "--mesh", "team", "--uses", "0"])?;
    bob.run(&["join", token.trim()])?;
    let sender = IpcClient::new(&alice.paths());
    let reader = IpcClient::new(&bob.paths());
    let add = |name: &str, kind: &str| -> anyhow::Result<i64> {
        let out = bob.run(&["webhook", "add", &format!("http://127.0.0.1:{port}/{kind}/{name}"), "--json"])?;
        let v: Value = serde_json::from_str(&out)?;
        let secret = v["secret"].as_str().context("secret")?;
        let bytes = STANDARD.decode(secret.trim_start_matches("whsec_"))?;
        receiver.secrets.lock().expect("lock").insert(name.to_owned(), bytes);
        v["webhook"]["id"].as_i64().context("id")
    };
    let send = |body: String| {
        let sender = sender.clone();
        async move {
            let req = SendRequest {
                client_message_id: uuid::Uuid::now_v7().to_string(),
                to: "bob".into(),
                body,
                mesh: Some("team".into()),
            };
            let r: Result<SendResponse, _> = sender.post(routes::SEND, &req).await;
            r.map_err(|e| anyhow::anyhow!("send: {e}"))
        }
    };
    // Bob is in alice's roster before the clock starts.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !alice.run(&["peers", "--mesh", "team"])?.contains("bob") {
        if Instant::now() > deadline {
            bail!("bob never appeared in alice's roster");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // Latency, one message at a time, to one endpoint.
    let first = add("lat", "ok")?;
    let mut latency = Latencies::default();
    for i in 0..messages {
        let body = format!("lat {i}");
        let t = Instant::now();
        send(body.clone()).await?;
        let at = wait_for(&mut rx, |(_, b, _)| *b == body).await?;
        latency.push(at.duration_since(t));
    }

    // Sustained: a burst, to one endpoint, then to ten.
    let one = sustained(&mut rx, &send, burst, 1).await?;
    let mut ids = vec![first];
    for i in 1..10 {
        ids.push(add(&format!("many{i}"), "ok")?);
    }
    let ten = sustained(&mut rx, &send, burst, 10).await?;
    for id in &ids {
        bob.run(&["webhook", "remove", &id.to_string()])?;
    }

    // Inbox accept: send to filed, with no endpoint, then while one endpoint never answers.
    reader.post::<_, InboxAckResponse>(routes::INBOX_ACK, &InboxAckRequest { ids: vec![], all: true }).await.ok();
    let accept_alone = accept(&reader, &send, messages, "alone").await?;
    add("stuck", "hang")?;
    let accept_hung = accept(&reader, &send, messages, "hung").await?;
    server.abort();
    Ok(json!({
        "scenario": "webhook",
        "messages": messages,
        // `POST /v1/send` on alice's daemon to the verified request at the receiver bob's daemon posts to.
        "p50_ms": r3(latency.pct(50.0)),
        "p99_ms": r3(latency.pct(99.0)),
        // Every message reached the receiver, verified (the bursts are waited for in full).
        "delivered_ratio": latency.len() as f64 / messages.max(1) as f64,
        "burst": burst,
        "deliveries_per_s_1_endpoint": r3(one),
        "deliveries_per_s_10_endpoints": r3(ten),
        // Send to filed in bob's inbox (long poll), without an endpoint and while one hangs.
        "accept_p50_ms": r3(accept_alone.pct(50.0)),
        "accept_p99_ms": r3(accept_alone.pct(99.0)),
        "accept_p50_ms_one_hanging": r3(accept_hung.pct(50.0)),
        "accept_p99_ms_one_hanging": r3(accept_hung.pct(99.0)),
        "refused_signatures": receiver.refused.load(std::sync::atomic::Ordering::Relaxed),
    }))
}

/// The next verified request `matches` accepts (others are dropped), within 30 s.
async fn wait_for(rx: &mut mpsc::UnboundedReceiver<Seen>, matches: impl Fn(&Seen) -> bool) -> anyhow::Result<Instant> {
    loop {
        let seen = tokio::time::timeout(Duration::from_secs(30), rx.recv())
            .await
            .context("no webhook request for 30 s")?
            .context("the receiver stopped")?;
        if matches(&seen) {
            return Ok(seen.2);
        }
    }
}

/// Sends `burst` messages back to back and waits for `burst × endpoints` verified requests; the
/// deliveries per second from the first send to the last request.
async fn sustained<F, Fut>(
    rx: &mut mpsc::UnboundedReceiver<Seen>,
    send: &F,
    burst: usize,
    endpoints: usize,
) -> anyhow::Result<f64>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<SendResponse>>,
{
    let tag = format!("burst{endpoints}");
    let t = Instant::now();
    for i in 0..burst {
        send(format!("{tag} {i}")).await?;
    }
    let mut got = 0;
    let mut last = t;
    while got < burst * endpoints {
        last = wait_for(rx, |(_, b, _)| b.starts_with(&tag)).await?;
        got += 1;
    }
    Ok(got as f64 / last.duration_since(t).as_secs_f64().max(1e-9))
}

/// Send to filed in the reader's inbox, one message at a time (a long poll for unread ones, then
/// marked read).
async fn accept<F, Fut>(reader: &IpcClient, send: &F, messages: usize, tag: &str) -> anyhow::Result<Latencies>
where
    F: Fn(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<SendResponse>>,
{
    let mut lat = Latencies::default();
    for i in 0..messages {
        let body = format!("accept {tag} {i}");
        let t = Instant::now();
        send(body.clone()).await?;
        loop {
            let q = InboxQuery { unread: true, wait_ms: Some(10_000), limit: Some(10), ..InboxQuery::default() };
            let rows: Vec<InboxMessage> =
                reader.get_query(routes::INBOX, &q).await.map_err(|e| anyhow::anyhow!("inbox: {e}"))?;
            if rows.iter().any(|m| m.body.as_deref() == Some(body.as_str())) {
                break;
            }
            if rows.is_empty() {
                bail!("{body:?} was not filed within 10 s");
            }
            // Others unread (filed earlier) are marked read; ours may still be being decrypted.
            let ids: Vec<i64> = rows.iter().filter(|m| m.body.is_some()).map(|m| m.id).collect();
            if !ids.is_empty() {
                reader.post::<_, InboxAckResponse>(routes::INBOX_ACK, &InboxAckRequest { ids, all: false }).await.ok();
            }
        }
        lat.push(t.elapsed());
        reader.post::<_, InboxAckResponse>(routes::INBOX_ACK, &InboxAckRequest { ids: vec![], all: true }).await.ok();
    }
    Ok(lat)
}
