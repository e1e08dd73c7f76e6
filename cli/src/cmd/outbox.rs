//! `mesh outbox`.

use mesh_ipc::api::{OutboxEntry, OutboxQuery, OutboxStatus, TargetKind};
use mesh_ipc::routes;

use crate::output;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct OutboxArgs {
    #[command(subcommand)]
    pub action: Option<OutboxAction>,
    /// Only rows in this state
    #[arg(long, value_parser = parse_status)]
    pub status: Option<OutboxStatus>,
    /// The newest N rows
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    #[arg(long)]
    pub json: bool,
}

#[derive(clap::Subcommand, Debug)]
pub enum OutboxAction {
    /// Send a dead or aborted message again, exactly as it was (same target, same encryption)
    Retry {
        id: i64,
        #[arg(long)]
        json: bool,
    },
    /// Stop a pending message from being sent
    Abort {
        id: i64,
        #[arg(long)]
        json: bool,
    },
}

fn parse_status(s: &str) -> Result<OutboxStatus, String> {
    OutboxStatus::parse(s).ok_or_else(|| "one of pending, inflight, done, dead, aborted".to_owned())
}

pub fn run(args: OutboxArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    if let Some(action) = args.action {
        let (route, id, json, verb) = match action {
            OutboxAction::Retry { id, json } => (routes::OUTBOX_RETRY, id, json, "will be sent again"),
            OutboxAction::Abort { id, json } => (routes::OUTBOX_ABORT, id, json, "aborted"),
        };
        let entry: OutboxEntry = super::block_on(client.post(&routes::with_id(route, id), &serde_json::json!({})))??;
        if json {
            return super::print_json(&entry);
        }
        println!("outbox #{id} {verb}: now {}", entry.status.as_str());
        return Ok(());
    }
    let q = OutboxQuery { status: args.status, limit: Some(args.limit) };
    let rows: Vec<OutboxEntry> = super::block_on(client.get_query(routes::OUTBOX, &q))??;
    if args.json {
        return super::print_json(&rows);
    }
    if rows.is_empty() {
        println!("outbox is empty");
    }
    for r in &rows {
        let to = match (&r.target.kind, &r.target.name) {
            (TargetKind::Direct, Some(n)) => n.clone(),
            (TargetKind::Broadcast, _) => "everyone".to_owned(),
            _ => r.target.address.clone(),
        };
        let mut state = r.status.as_str().to_owned();
        if let Some(t) = r.read_at {
            state = format!("read {}", output::ago(t));
        } else if let Some(t) = r.delivered_at {
            state = format!("delivered {}", output::ago(t));
        } else if r.status == OutboxStatus::Done {
            state = "accepted by broker".to_owned();
        }
        let err = r.last_error.as_deref().map(|e| format!("  last error: {e}")).unwrap_or_default();
        let who = r.session.as_deref().map(|s| format!(" from session {s}")).unwrap_or_default();
        println!(
            "#{:<5} {}  → {to} [{}]{who} {state} (attempts {}): {}{err}",
            r.id,
            output::time(r.enqueued_at),
            r.mesh,
            r.attempts,
            output::preview(&r.body, 60)
        );
    }
    Ok(())
}
