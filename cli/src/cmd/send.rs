//! `mesh send`.

use std::io::Read;

use anyhow::Context;
use mesh_ipc::api::{SendRequest, SendResponse, TargetKind, WaitFor, WaitQuery, WaitResponse};
use mesh_ipc::routes;

#[derive(clap::Args, Debug)]
pub struct SendArgs {
    /// A display name, a full public key, @group, or * for everyone
    pub target: String,
    /// The message; `-` reads it from standard input
    pub message: String,
    /// The mesh (needed when the target could be in more than one)
    #[arg(long)]
    pub mesh: Option<String>,
    /// Reuse this key to make a retried send idempotent (default: a fresh id)
    #[arg(long)]
    pub idempotency_key: Option<String>,
    /// Block until the broker accepted it, every recipient's daemon has it, or every recipient read it
    /// (exit 1 if not in time)
    #[arg(long, value_enum)]
    pub wait: Option<Wait>,
    /// How long --wait waits
    #[arg(long, default_value = "30s", value_parser = humantime::parse_duration, requires = "wait")]
    pub timeout: std::time::Duration,
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
        std::io::stdin().read_to_string(&mut s).context("reading the message from standard input")?;
        s
    } else {
        args.message
    };
    // Minted here, before the first attempt, so a retry after a timeout can never send twice.
    let client_message_id = args.idempotency_key.unwrap_or_else(|| uuid::Uuid::now_v7().to_string());
    let client = super::client()?;
    let req = SendRequest { client_message_id, to: args.target, body, mesh: args.mesh };
    let resp: SendResponse = super::block_on(client.post(routes::SEND, &req))??;
    if let Some(wait) = args.wait {
        return wait_for(&client, &resp, wait, args.timeout);
    }
    if crate::output::json() {
        return super::print_json(&resp);
    }
    outln!("{}", describe(&resp));
    Ok(())
}

fn describe(resp: &SendResponse) -> String {
    let to = match (&resp.target.kind, &resp.target.name) {
        (TargetKind::Direct, Some(name)) => format!("{name} ({})", crate::output::short(&resp.target.address)),
        (TargetKind::Broadcast, _) => "everyone".to_owned(),
        _ => resp.target.address.clone(),
    };
    let again = if resp.duplicate { " (already queued earlier with this idempotency key)" } else { "" };
    format!("queued for {to} in mesh {} as outbox #{}: {}{again}", resp.mesh, resp.outbox_id, resp.status.as_str())
}

fn wait_for(
    client: &mesh_ipc::IpcClient,
    resp: &SendResponse,
    wait: Wait,
    timeout: std::time::Duration,
) -> anyhow::Result<()> {
    let until = match wait {
        Wait::Accepted => WaitFor::Accepted,
        Wait::Delivered => WaitFor::Delivered,
        Wait::Read => WaitFor::Read,
    };
    let q = WaitQuery { until, timeout_ms: Some(timeout.as_millis() as u64) };
    let route = mesh_ipc::routes::with_id(routes::OUTBOX_WAIT, resp.outbox_id);
    let waited: WaitResponse = super::block_on(client.get_query(&route, &q))??;
    if crate::output::json() {
        super::print_json(&waited)?;
    } else if waited.reached {
        let what = match until {
            WaitFor::Accepted => "accepted by the broker".to_owned(),
            WaitFor::Delivered => format!("delivered to {} recipient(s)", waited.entry.delivered_count),
            WaitFor::Read => format!("read by {} recipient(s)", waited.entry.read_count),
        };
        outln!("{}\n{what}", describe(resp));
    }
    if !waited.reached {
        let e = &waited.entry;
        let why = e.last_error.as_deref().map(|m| format!(" (last error: {m})")).unwrap_or_default();
        anyhow::bail!(
            "outbox #{} not {} within {}: it is {}{why}; follow it with `mesh outbox`",
            e.id,
            match until {
                WaitFor::Accepted => "accepted",
                WaitFor::Delivered => "delivered",
                WaitFor::Read => "read",
            },
            humantime::format_duration(timeout),
            e.status.as_str()
        );
    }
    Ok(())
}
