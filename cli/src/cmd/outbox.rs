//! `mesh outbox`.

use mesh_ipc::api::{LinkState, OutboxEntry, OutboxQuery, OutboxStatus, TargetKind};
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
    /// Only messages sent in this mesh (default: the context, `mesh use`, else every mesh)
    #[arg(long)]
    pub mesh: Option<String>,
    /// Every mesh, whatever the context
    #[arg(long, conflicts_with = "mesh")]
    pub all_meshes: bool,
    /// The newest N rows
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
}

#[derive(clap::Subcommand, Debug)]
pub enum OutboxAction {
    /// Send a dead or aborted message again, exactly as it was (same target, same encryption)
    Retry {
        /// The outbox id (see `mesh outbox`)
        id: i64,
    },
    /// Stop a pending message from being sent
    Abort {
        /// The outbox id (see `mesh outbox`)
        id: i64,
    },
}

fn parse_status(s: &str) -> Result<OutboxStatus, String> {
    OutboxStatus::parse(s).ok_or_else(|| "one of pending, inflight, done, dead, aborted".to_owned())
}

pub fn run(args: OutboxArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    if let Some(action) = args.action {
        let (route, id, verb) = match action {
            OutboxAction::Retry { id } => (routes::OUTBOX_RETRY, id, "will be sent again"),
            OutboxAction::Abort { id } => (routes::OUTBOX_ABORT, id, "aborted"),
        };
        let entry: OutboxEntry = super::block_on(client.post(&routes::with_id(route, id), &serde_json::json!({})))??;
        if crate::output::json() {
            return super::print_json(&entry);
        }
        outln!("outbox #{id} {verb}: now {}", entry.status.as_str());
        return Ok(());
    }
    let q = OutboxQuery {
        status: args.status,
        mesh: super::context_mesh(args.mesh)?,
        all_meshes: args.all_meshes,
        limit: Some(args.limit),
    };
    let rows: Vec<OutboxEntry> = super::block_on(client.get_query(routes::OUTBOX, &q))??;
    if crate::output::json() {
        return super::print_json(&rows);
    }
    if rows.is_empty() {
        outln!("outbox is empty");
    }
    for r in &rows {
        let to = match (&r.target.kind, &r.target.name) {
            (TargetKind::Direct, Some(n)) => format!("{n} ({})", output::short(&r.target.address)),
            (TargetKind::Broadcast, _) => "everyone".to_owned(),
            _ => r.target.address.clone(),
        };
        let state = state(r);
        let err = r.last_error.as_deref().map(|e| format!("  last error: {e}")).unwrap_or_default();
        let waiting = waiting_for(r).map(|w| format!("  ({w})")).unwrap_or_default();
        let who = r.session.as_deref().map(|s| format!(" from session {s}")).unwrap_or_default();
        let line = format!(
            "#{:<5} {}  → {to} [{}]{who} {state} (attempts {}): {}{waiting}{err}",
            r.id,
            output::time(r.enqueued_at),
            r.mesh,
            r.attempts,
            output::preview(&r.body, 60)
        );
        outln!("{}", output::clean(&line));
    }
    Ok(())
}

/// Why a row the broker has not accepted yet is still waiting: its connection's state and the next
/// attempt.
pub fn waiting_for(r: &OutboxEntry) -> Option<String> {
    let link = r.link.as_ref()?;
    let next = r.next_attempt_at.map(|t| format!("; next attempt {}", output::until(t))).unwrap_or_default();
    Some(match link.state {
        LinkState::Online => format!("broker connection online{next}"),
        state => {
            let why = link.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default();
            // The row's own next attempt means nothing until the connection is back.
            format!(
                "broker connection {} since {}{why}; sent once it is online",
                state.as_str(),
                output::ago(link.since)
            )
        }
    })
}

/// Where a sent message stands, in words: receipts counted against its recipients.
pub fn state(r: &OutboxEntry) -> String {
    let of = |n: u32| match r.recipients {
        Some(total) if total != 1 => format!(" {n}/{total}"),
        _ => String::new(),
    };
    match r.status {
        OutboxStatus::Done if r.read_count > 0 => {
            format!("read{}{}", of(r.read_count), r.read_at.map(|t| format!(" {}", output::ago(t))).unwrap_or_default())
        }
        OutboxStatus::Done if r.delivered_count > 0 => format!(
            "delivered{}{}",
            of(r.delivered_count),
            r.delivered_at.map(|t| format!(" {}", output::ago(t))).unwrap_or_default()
        ),
        OutboxStatus::Done if r.recipients == Some(0) => "accepted by the broker, no recipients".to_owned(),
        OutboxStatus::Done if r.expired_count + r.revoked_count >= r.recipients.unwrap_or(1) => {
            match (r.expired_count, r.revoked_count) {
                (0, _) => "not delivered: the recipient left the mesh".to_owned(),
                (_, 0) => "not delivered: expired".to_owned(),
                _ => "not delivered: expired, or the recipient left the mesh".to_owned(),
            }
        }
        OutboxStatus::Done => "accepted by the broker".to_owned(),
        other => other.as_str().to_owned(),
    }
}
