//! `mesh send`.

use std::io::Read;

use anyhow::Context;
use mesh_ipc::api::{SendRequest, SendResponse, TargetKind};
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
    #[arg(long)]
    pub json: bool,
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
    if args.json {
        return super::print_json(&resp);
    }
    let to = match (&resp.target.kind, &resp.target.name) {
        (TargetKind::Direct, Some(name)) => format!("{name} ({})", crate::output::short(&resp.target.address)),
        (TargetKind::Broadcast, _) => "everyone".to_owned(),
        _ => resp.target.address.clone(),
    };
    let again = if resp.duplicate { " (already queued earlier with this idempotency key)" } else { "" };
    println!("queued for {to} in mesh {} as outbox #{}: {}{again}", resp.mesh, resp.outbox_id, resp.status.as_str());
    Ok(())
}
