//! The webhook worker: claims due deliveries under a lease, POSTs them (at most
//! `max_in_flight_per_endpoint` per endpoint and `max_in_flight` in all), and records each outcome.
//!
//! It is woken by the daemon's change signal (a delivery queued, an endpoint enabled), by its own
//! attempts finishing, and by the time the next retry or lease falls due; it never runs on the
//! accept path, so a slow endpoint delays nothing but its own deliveries.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{Notify, Semaphore};

use super::{Config, Job, Outcome, Settled};
use crate::clock::now_ms;
use crate::daemon::Daemon;

/// How much of an answer's body is read (into `last_error`); the rest is dropped.
const MAX_ANSWER_BYTES: usize = 4096;
/// How often pending rows past their deadline and expired secrets are looked for.
const MAINTAIN_EVERY: Duration = Duration::from_secs(30);
/// The longest the worker sleeps without looking again (the change signal is only a hint).
const POLL: Duration = Duration::from_secs(30);

pub async fn run(d: Arc<Daemon>, cfg: Config) {
    let client = match client(&cfg) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %mesh_proto::error::chain(&e), "webhooks: cannot build the HTTP client; no webhook will be delivered");
            return;
        }
    };
    match d.db.call(|c| super::release_leases(c)).await {
        Ok(0) => {}
        Ok(n) => tracing::info!(deliveries = n, "webhooks: attempts cut short by the last stop will be made again"),
        Err(e) => tracing::error!(error = %mesh_proto::error::chain(&e), "webhooks: releasing leases"),
    }
    let cfg = Arc::new(cfg);
    let slots = Slots {
        active: Arc::new(Semaphore::new(cfg.max_in_flight as usize)),
        slow: Arc::new(Semaphore::new(cfg.max_in_flight as usize)),
        finished: Arc::new(Notify::new()),
    };
    let finished = slots.finished.clone();
    let mut changed = d.subscribe();
    let mut turn = 0usize;
    let mut last_maintained: Option<tokio::time::Instant> = None;
    loop {
        changed.borrow_and_update();
        if last_maintained.is_none_or(|t| t.elapsed() >= MAINTAIN_EVERY) {
            last_maintained = Some(tokio::time::Instant::now());
            match d.db.call(|c| super::maintain(c, now_ms())).await {
                Ok((0, _)) => {}
                Ok((dead, _)) => {
                    tracing::warn!(deliveries = dead, "webhooks: deliveries passed their deadline and are dead");
                    d.notify_changed();
                }
                Err(e) => tracing::error!(error = %mesh_proto::error::chain(&e), "webhooks: maintenance"),
            }
        }
        let (caps, lease) = (super::Caps::new(&cfg, slots.active.available_permits()), cfg.lease_ms());
        turn = turn.wrapping_add(1);
        let claimed = d.db.call(move |c| super::claim(c, caps, turn, lease, now_ms())).await;
        let next_at = match claimed {
            Ok(claimed) => {
                for job in claimed.jobs {
                    let Ok(permit) = slots.active.clone().try_acquire_owned() else { break };
                    let (d, client, cfg, slots) = (d.clone(), client.clone(), cfg.clone(), slots.clone());
                    d.clone().tracker.spawn(async move {
                        attempt(&d, &client, &cfg, job, permit, &slots).await;
                        slots.finished.notify_one();
                    });
                }
                claimed.next_at
            }
            Err(e) => {
                tracing::error!(error = %mesh_proto::error::chain(&e), "webhooks: claiming deliveries");
                None
            }
        };
        let wait = next_at.map_or(POLL, |at| Duration::from_millis(at.saturating_sub(now_ms())).min(POLL));
        tokio::select! {
            () = d.shutdown.cancelled() => return,
            r = changed.changed() => if r.is_err() { return },
            () = finished.notified() => {}
            () = tokio::time::sleep(wait.max(Duration::from_millis(5))) => {}
        }
    }
}

fn client(cfg: &Config) -> reqwest::Result<reqwest::Client> {
    // One process-wide TLS provider (ring); a second install is a no-op error.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(cfg.timeout)
        .connect_timeout(cfg.timeout)
        .no_proxy()
        .user_agent(concat!("mesh-webhooks/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// The worker's slots: `max_in_flight` active ones, which claims are counted against, and as many
/// for requests that have run over [`super::SLOW_ANSWER`]. A request that slow moves to a slow slot
/// when one is free and gives its active slot back, so requests that hang (even to endpoints that
/// usually answer at once) cannot hold every slot.
#[derive(Clone)]
struct Slots {
    active: Arc<Semaphore>,
    slow: Arc<Semaphore>,
    finished: Arc<Notify>,
}

/// One POST of one delivery, and its outcome recorded.
async fn attempt(
    d: &Daemon,
    client: &reqwest::Client,
    cfg: &Config,
    job: Job,
    permit: tokio::sync::OwnedSemaphorePermit,
    slots: &Slots,
) {
    // A broker may have been started on the endpoint's port since it was added. The daemon stopping
    // abandons the attempt: its lease is released at the next start, and it is made again then.
    let attempt = async {
        match super::check_url_now(d, &job.url, true).await {
            Ok(Err(e @ super::UrlError::OwnBroker(_))) => Outcome::OwnBroker(format!("not posted: {e}")),
            _ => {
                let request = post(client, &job);
                tokio::pin!(request);
                tokio::select! {
                    outcome = &mut request => outcome,
                    () = tokio::time::sleep(super::SLOW_ANSWER) => {
                        let _slow = match slots.slow.clone().try_acquire_owned() {
                            Ok(slow) => {
                                drop(permit);
                                slots.finished.notify_one();
                                Some(slow)
                            }
                            Err(_) => None,
                        };
                        request.await
                    }
                }
            }
        }
    };
    let outcome = tokio::select! {
        outcome = attempt => outcome,
        () = d.shutdown.cancelled() => return,
    };
    let (job_c, outcome_c, cfg_c) = (job.clone(), outcome.clone(), cfg.clone());
    let jitter = super::jitter();
    match d.db.call(move |c| super::settle(c, &job_c, &outcome_c, &cfg_c, now_ms(), jitter)).await {
        Ok(settled) => {
            d.counters.webhook_attempt(match settled {
                Settled::Delivered => "delivered",
                Settled::RetryAt(_) => "retry",
                Settled::Dead => "dead",
                Settled::Disabled => "disabled",
                Settled::Stale => "stale",
            });
            match settled {
                Settled::Delivered | Settled::Stale => {
                    tracing::debug!(webhook = job.webhook, delivery = job.delivery, ?settled, "webhook attempt")
                }
                Settled::RetryAt(_) | Settled::Dead | Settled::Disabled => tracing::info!(
                    webhook = job.webhook,
                    delivery = job.delivery,
                    ?settled,
                    outcome = %describe(&outcome),
                    "webhook attempt failed"
                ),
            }
            d.notify_changed();
        }
        Err(e) => tracing::error!(error = %mesh_proto::error::chain(&e), delivery = job.delivery,
            "webhooks: recording an attempt; it will be made again when its lease runs out"),
    }
}

/// An outcome for the log: the status, or the kind of failure, never the answer's text (an endpoint
/// may echo the message back).
fn describe(o: &Outcome) -> String {
    match o {
        Outcome::Delivered { status, .. } | Outcome::Refused { status, .. } => format!("{status}"),
        Outcome::Retry { status: Some(status), .. } => format!("{status}"),
        Outcome::Gone => "410".into(),
        Outcome::OwnBroker(_) => "own broker".into(),
        Outcome::Retry { status: None, error, .. } => error.split(':').next().unwrap_or("failed").to_owned(),
    }
}

async fn post(client: &reqwest::Client, job: &Job) -> Outcome {
    let started = tokio::time::Instant::now();
    let timestamp = now_ms() / 1000;
    let secrets: Vec<&str> = job.secrets.iter().map(String::as_str).collect();
    let signature = super::sign::header(&secrets, &job.uid, timestamp, job.payload.as_bytes());
    let sent = client
        .post(&job.url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header("webhook-id", &job.uid)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(job.payload.clone())
        .send()
        .await;
    let mut resp = match sent {
        Ok(r) => r,
        Err(e) => {
            let what = if e.is_timeout() {
                "no answer in time"
            } else if e.is_connect() {
                "could not connect"
            } else {
                "request failed"
            };
            return Outcome::Retry { status: None, error: format!("{what}: {}", error_text(&e)), retry_after: None };
        }
    };
    let status = resp.status().as_u16();
    let retry_after =
        resp.headers().get(reqwest::header::RETRY_AFTER).and_then(|v| v.to_str().ok()).and_then(parse_retry_after);
    let answer = read_bounded(&mut resp).await;
    let error = || {
        let reason = resp.status().canonical_reason().unwrap_or("");
        let text = answer.trim();
        if text.is_empty() { format!("{status} {reason}") } else { format!("{status} {reason}: {text}") }
    };
    match status {
        200..=299 => Outcome::Delivered { status, slow: started.elapsed() > super::SLOW_ANSWER },
        410 => Outcome::Gone,
        429 | 500..=599 => Outcome::Retry { status: Some(status), error: error(), retry_after },
        _ => Outcome::Refused { status, error: error() },
    }
}

/// The error and its causes, without the URL (it may carry a token in its query).
fn error_text(e: &reqwest::Error) -> String {
    let mut parts = Vec::new();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        parts.push(s.to_string());
        source = s.source();
    }
    if parts.is_empty() { "no detail".into() } else { parts.join(": ") }
}

/// The first bytes of an answer's body, as text with control characters replaced.
async fn read_bounded(resp: &mut reqwest::Response) -> String {
    let mut bytes = Vec::new();
    while bytes.len() < MAX_ANSWER_BYTES {
        match resp.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk[..chunk.len().min(MAX_ANSWER_BYTES - bytes.len())]),
            _ => break,
        }
    }
    let text: String =
        String::from_utf8_lossy(&bytes).chars().map(|c| if c.is_control() { ' ' } else { c }).take(300).collect();
    text
}

/// `Retry-After`: seconds, or an HTTP date.
fn parse_retry_after(v: &str) -> Option<Duration> {
    let v = v.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(v).ok()?;
    Some(at.duration_since(std::time::SystemTime::now()).unwrap_or_default())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_is_seconds_or_a_date() {
        assert_eq!(parse_retry_after("120"), Some(Duration::from_secs(120)));
        assert_eq!(parse_retry_after(" 0 "), Some(Duration::ZERO));
        assert_eq!(parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT"), Some(Duration::ZERO), "a past date is now");
        let later = httpdate::fmt_http_date(std::time::SystemTime::now() + Duration::from_secs(3600));
        let d = parse_retry_after(&later).expect("a date");
        assert!(d > Duration::from_secs(3500) && d <= Duration::from_secs(3600), "{d:?}");
        assert_eq!(parse_retry_after("soon"), None);
    }
}
