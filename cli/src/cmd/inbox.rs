//! `mesh inbox` and its actions: ack, flush, delete, replay.

use anyhow::bail;
use mesh_ipc::api::{
    InboxAckRequest, InboxAckResponse, InboxDeleteRequest, InboxDeleteResponse, InboxFlushRequest, InboxFlushResponse,
    InboxMessage, InboxQuery, InboxStatus, TargetKind,
};
use mesh_ipc::routes;

use crate::output;

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct InboxArgs {
    #[command(subcommand)]
    pub action: Option<InboxAction>,
    /// Only messages not yet marked read
    #[arg(long)]
    pub unread: bool,
    /// Only from this sender (display name or full key)
    #[arg(long)]
    pub from: Option<String>,
    /// Only messages of this mesh (default: the context, `mesh use`, else every mesh)
    #[arg(long)]
    pub mesh: Option<String>,
    /// Every mesh, whatever the context
    #[arg(long, conflicts_with = "mesh")]
    pub all_meshes: bool,
    /// The newest N messages
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    /// When no message matches, wait this long (at most 10m) for one that does (e.g. 30s)
    #[arg(long, value_parser = super::send::parse_timeout)]
    pub wait: Option<std::time::Duration>,
}

#[derive(clap::Subcommand, Debug)]
pub enum InboxAction {
    /// Mark messages read and tell their senders (a `read` receipt)
    Ack {
        /// Inbox ids (see `mesh inbox`)
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        /// Every unread message
        #[arg(long)]
        all: bool,
    },
    /// Delete read messages (with --all: every message, read or not)
    Flush {
        /// Only messages received before this: a time (2026-11-23T10:00:00Z) or an age (2h, 3d)
        #[arg(long, value_parser = parse_before)]
        before: Option<u64>,
        /// Also unread and unreadable messages
        #[arg(long)]
        all: bool,
    },
    /// Delete these messages
    Delete {
        /// Inbox ids (see `mesh inbox`)
        #[arg(required = true)]
        ids: Vec<i64>,
    },
    /// Process a message again (one that failed to verify or decrypt)
    Replay {
        /// The inbox id of a message shown as unreadable
        id: i64,
    },
}

/// An RFC 3339 time, or an age like `2h` (that long ago), as ms since the epoch.
fn parse_before(s: &str) -> Result<u64, String> {
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return t.duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).map_err(|e| e.to_string());
    }
    let age = humantime::parse_duration(s).map_err(|_| format!("{s:?} is neither a time nor an age like 2h"))?;
    Ok(mesh_proto::now_ms().saturating_sub(age.as_millis() as u64))
}

pub fn run(args: InboxArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    if let Some(action) = args.action {
        return act(&client, action);
    }
    let q = InboxQuery {
        mesh: super::context_mesh(args.mesh)?,
        all_meshes: args.all_meshes,
        unread: args.unread,
        from: args.from,
        limit: Some(args.limit),
        wait_ms: args.wait.map(|w| w.as_millis() as u64),
        ..InboxQuery::default()
    };
    let messages: Vec<InboxMessage> = super::block_on(client.get_query(routes::INBOX, &q))??;
    if crate::output::json() {
        return super::print_json(&messages);
    }
    if messages.is_empty() {
        outln!("inbox is empty");
    }
    for m in &messages {
        outln!("{}", output::clean(&line(m)));
    }
    Ok(())
}

fn line(m: &InboxMessage) -> String {
    let to = match m.kind {
        TargetKind::Direct => "you".to_owned(),
        TargetKind::Broadcast => "everyone".to_owned(),
        TargetKind::Group => m.to.clone(),
    };
    let unread = if m.read_at.is_none() { "*" } else { " " };
    let body = match (m.status, &m.body) {
        (InboxStatus::Ready, Some(b)) => output::preview(b, 200),
        (InboxStatus::Failed, _) => format!("[unreadable: {}]", m.error.as_deref().unwrap_or("unknown reason")),
        _ => "[not yet processed]".to_owned(),
    };
    format!(
        "{unread}#{:<5} {}  {} ({}) → {to} [{}]: {body}",
        m.id,
        output::time(m.sent_at),
        m.from_name,
        output::short(&m.from),
        m.mesh
    )
}

fn act(client: &mesh_ipc::IpcClient, action: InboxAction) -> anyhow::Result<()> {
    match action {
        InboxAction::Ack { ids, all } => {
            let r: InboxAckResponse = super::block_on(client.post(routes::INBOX_ACK, &InboxAckRequest { ids, all }))??;
            if crate::output::json() {
                super::print_json(&r)?;
            } else {
                if !r.acked.is_empty() {
                    outln!("marked {} message(s) read; their senders will get a read receipt", r.acked.len());
                } else if r.already_read.is_empty() && r.not_found.is_empty() {
                    outln!("nothing unread: no message was marked read");
                }
                if !r.already_read.is_empty() {
                    outln!("already read: {}", ids_list(&r.already_read));
                }
            }
            if !r.not_found.is_empty() {
                return Err(not_found(&r.not_found));
            }
        }
        InboxAction::Flush { before, all } => {
            let r: InboxFlushResponse =
                super::block_on(client.post(routes::INBOX_FLUSH, &InboxFlushRequest { before, all }))??;
            if crate::output::json() {
                return super::print_json(&r);
            }
            let what = if all { "message(s)" } else { "read message(s)" };
            outln!("deleted {} {what}", r.deleted);
        }
        InboxAction::Delete { ids } => {
            let r: InboxDeleteResponse =
                super::block_on(client.post(routes::INBOX_DELETE, &InboxDeleteRequest { ids }))??;
            if crate::output::json() {
                super::print_json(&r)?;
            } else if !r.deleted.is_empty() {
                outln!("deleted {} message(s)", r.deleted.len());
            }
            if !r.not_found.is_empty() {
                return Err(not_found(&r.not_found));
            }
        }
        InboxAction::Replay { id } => {
            let m: InboxMessage =
                super::block_on(client.post(&routes::with_id(routes::INBOX_REPLAY, id), &serde_json::json!({})))??;
            if crate::output::json() {
                return super::print_json(&m);
            }
            outln!("{}", output::clean(&line(&m)));
            if m.status != InboxStatus::Ready {
                bail!("inbox #{id} is still {}", m.status.as_str());
            }
        }
    }
    Ok(())
}

fn ids_list(ids: &[i64]) -> String {
    ids.iter().map(|id| format!("#{id}")).collect::<Vec<_>>().join(", ")
}

/// Some ids named no message of the caller's: a failure, never a silent success.
fn not_found(ids: &[i64]) -> anyhow::Error {
    crate::output::fail(
        "not_found",
        format!("no message {} in your inbox", ids_list(ids)),
        Some("`mesh inbox` lists your messages and their ids".into()),
    )
}
