//! `mesh send`.

use std::io::Read;

use mesh_ipc::MAX_MESSAGE_BYTES;
use mesh_ipc::api::{
    OutboxEntry, OutboxStatus, SendRequest, SendResponse, SendWait, TargetKind, WaitFor, WaitQuery, WaitResponse,
};
use mesh_ipc::routes;

#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// A display name, a full key, a unique key prefix (4+ hex digits, e.g. the 8 shown by `mesh
    /// peers`), @group, or * for everyone in the mesh
    pub target: String,
    /// The message (at most 64 KiB); `-` reads it from standard input
    pub message: String,
    /// The mesh (default: MESH_CONTEXT, then `mesh use`, else wherever the target is)
    #[arg(long)]
    pub mesh: Option<String>,
    /// Reuse this key to make a retried send idempotent (default: a fresh id)
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Block until the broker accepted it, every recipient's daemon has it, or every recipient read it
    /// (exit 1 if not in time; the message stays queued either way)
    #[arg(long, value_enum)]
    pub wait: Option<Wait>,
    /// How long --wait waits (at most 10m)
    #[arg(long, default_value = "30s", value_parser = parse_timeout, requires = "wait")]
    pub timeout: std::time::Duration,
}

/// A `--timeout`: a duration up to the daemon's longest wait, 10 minutes.
pub(crate) fn parse_timeout(s: &str) -> Result<std::time::Duration, String> {
    let d = humantime::parse_duration(s).map_err(|e| e.to_string())?;
    if d > std::time::Duration::from_secs(600) {
        return Err("at most 10m: to follow a message longer, use `mesh watch` or `mesh outbox`".into());
    }
    Ok(d)
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum Wait {
    Accepted,
    Delivered,
    Read,
}

pub fn run(args: SendArgs) -> anyhow::Result<()> {
    let body = if args.message == "-" {
        let mut s = String::new();
        std::io::stdin().read_to_string(&mut s).map_err(|e| match e.kind() {
            std::io::ErrorKind::InvalidData => crate::output::fail(
                "bad_request",
                "the message on standard input is not valid UTF-8 text",
                Some("send text; for binary data, send a path or an encoding such as base64".into()),
            ),
            _ => anyhow::Error::new(e).context("reading the message from standard input"),
        })?;
        s
    } else {
        args.message
    };
    if body.len() > MAX_MESSAGE_BYTES {
        return Err(crate::output::fail(
            "payload_too_large",
            format!("the message is {} bytes; the limit is {MAX_MESSAGE_BYTES} bytes (64 KiB)", body.len()),
            Some("send a shorter message, or a path or link to the content".into()),
        ));
    }
    // Minted here, before the first attempt, so a retry after a timeout can never send twice.
    let client_message_id = args.idempotency_key.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let client = super::client()?;
    let req = SendRequest { client_message_id, to: args.target, body, mesh: super::context_mesh(args.mesh)? };
    let mut resp: SendResponse = super::block_on(client.post(routes::SEND, &req))??;
    if let Some(warning) = resp.warning.as_deref().filter(|_| !crate::output::json()) {
        errln!("note: {}", crate::output::clean(warning));
    }
    let Some(wait) = args.wait else {
        if crate::output::json() {
            return super::print_json(&resp);
        }
        outln!("{}", crate::output::clean(&describe(&resp)));
        return Ok(());
    };
    let until = match wait {
        Wait::Accepted => WaitFor::Accepted,
        Wait::Delivered => WaitFor::Delivered,
        Wait::Read => WaitFor::Read,
    };
    // What is committed is said before waiting: if the wait is cut short, the outbox id is known.
    if !crate::output::json() {
        outln!("{}", crate::output::clean(&describe(&resp)));
    }
    let q = WaitQuery { until, timeout_ms: Some(args.timeout.as_millis() as u64) };
    let route = mesh_ipc::routes::with_id(routes::OUTBOX_WAIT, resp.outbox_id);
    let waited: WaitResponse = match super::block_on(client.get_query(&route, &q))? {
        Ok(w) => w,
        Err(e) => {
            if crate::output::json() {
                super::print_json(&resp)?;
            }
            return Err(anyhow::Error::new(e).context(format!(
                "outbox #{} is committed, but waiting for its receipt failed; it goes out when the daemon runs \
                 (follow it with `mesh outbox`)",
                resp.outbox_id
            )));
        }
    };
    let e = &waited.entry;
    resp.status = e.status;
    resp.wait = Some(SendWait {
        until,
        reached: waited.reached,
        status: e.status,
        recipients: e.recipients,
        delivered_count: e.delivered_count,
        read_count: e.read_count,
        expired_count: e.expired_count,
        revoked_count: e.revoked_count,
    });
    if crate::output::json() {
        super::print_json(&resp)?;
    } else if waited.reached {
        outln!("{}", progress(until, e));
    }
    if !waited.reached {
        return Err(not_reached(until, e, args.timeout));
    }
    Ok(())
}

/// "delivered to 2 of 3 recipients", "accepted by the broker", …
fn progress(until: WaitFor, e: &OutboxEntry) -> String {
    let total = e.recipients.unwrap_or(1);
    let of = |n: u32, what: &str| match total {
        1 => what.to_owned(),
        _ => format!("{what} by {n} of {total} recipients"),
    };
    match until {
        WaitFor::Accepted => match e.recipients {
            Some(n) => format!("accepted by the broker for {n} recipient(s)"),
            None => "accepted by the broker".to_owned(),
        },
        WaitFor::Delivered => of(e.delivered_count, "delivered").replace("delivered by", "delivered to"),
        WaitFor::Read => of(e.read_count, "read"),
    }
}

/// Why `--wait` ended without its receipt, and what the message does next.
fn not_reached(until: WaitFor, e: &OutboxEntry, timeout: std::time::Duration) -> anyhow::Error {
    let waited = humantime::format_duration(timeout);
    let (message, hint) = match e.status {
        OutboxStatus::Dead => (
            format!("outbox #{} is dead: {}", e.id, e.last_error.as_deref().unwrap_or("refused")),
            "see `mesh outbox`; `mesh outbox retry ID` sends it again".to_owned(),
        ),
        OutboxStatus::Aborted => (format!("outbox #{} was aborted", e.id), "`mesh outbox retry ID` sends it".into()),
        OutboxStatus::Pending | OutboxStatus::Inflight => (
            format!(
                "outbox #{} is not accepted by the broker yet after {waited}{}",
                e.id,
                e.last_error.as_deref().map(|m| format!(" (last error: {m})")).unwrap_or_default()
            ),
            "it stays in the outbox and is retried; follow it with `mesh outbox`".into(),
        ),
        OutboxStatus::Done if e.expired_count > 0 => (
            format!("outbox #{}: {} recipient(s) did not take it before it expired", e.id, e.expired_count),
            "see `mesh outbox`".into(),
        ),
        OutboxStatus::Done if e.revoked_count > 0 => (
            format!("outbox #{}: {} recipient(s) left the mesh before taking it", e.id, e.revoked_count),
            "see `mesh outbox`".into(),
        ),
        OutboxStatus::Done => {
            let total = e.recipients.unwrap_or(1);
            let (n, what) = match until {
                WaitFor::Read => (e.read_count, "read"),
                _ => (e.delivered_count, "delivered"),
            };
            (
                format!("outbox #{} was {what} by {n} of {total} recipient(s) within {waited}", e.id),
                "it stays queued at the broker for the others (until its TTL); follow it with `mesh outbox`".into(),
            )
        }
    };
    // Ended early because it can never get there (dead, aborted, expired, its recipient left), or
    // out of time.
    let code = match e.status {
        OutboxStatus::Pending | OutboxStatus::Inflight => "wait_timeout",
        OutboxStatus::Done if e.expired_count + e.revoked_count == 0 => "wait_timeout",
        _ => "undelivered",
    };
    crate::output::fail(code, message, Some(hint))
}

fn describe(resp: &SendResponse) -> String {
    let to = match (&resp.target.kind, &resp.target.name) {
        (TargetKind::Direct, Some(name)) => format!("{name} ({})", crate::output::short(&resp.target.address)),
        (TargetKind::Broadcast, _) => "everyone".to_owned(),
        _ => resp.target.address.clone(),
    };
    let again = if resp.duplicate { " (already queued earlier with this idempotency key)" } else { "" };
    let to = if resp.target.address == resp.sender { format!("{to} — yourself") } else { to };
    format!("queued for {to} in mesh {} as outbox #{}: {}{again}", resp.mesh, resp.outbox_id, resp.status.as_str())
}
