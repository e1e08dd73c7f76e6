//! `mesh outbox`.

use mesh_ipc::api::{OutboxEntry, OutboxQuery, OutboxStatus, TargetKind};
use mesh_ipc::routes;

use crate::output;

#[derive(clap::Args, Debug)]
pub struct OutboxArgs {
    /// Only rows in this state
    #[arg(long, value_parser = parse_status)]
    pub status: Option<OutboxStatus>,
    /// The newest N rows
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    #[arg(long)]
    pub json: bool,
}

fn parse_status(s: &str) -> Result<OutboxStatus, String> {
    OutboxStatus::parse(s).ok_or_else(|| "one of pending, inflight, done, dead, aborted".to_owned())
}

pub fn run(args: OutboxArgs) -> anyhow::Result<()> {
    let client = super::client()?;
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
        println!(
            "#{:<5} {}  → {to} [{}] {state} (attempts {}): {}{err}",
            r.id,
            output::time(r.enqueued_at),
            r.mesh,
            r.attempts,
            output::preview(&r.body, 60)
        );
    }
    Ok(())
}
