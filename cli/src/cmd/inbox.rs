//! `mesh inbox`.

use mesh_ipc::api::{InboxMessage, InboxQuery, InboxStatus, TargetKind};
use mesh_ipc::routes;

use crate::output;

#[derive(clap::Args, Debug)]
pub struct InboxArgs {
    /// Only messages not yet marked read
    #[arg(long)]
    pub unread: bool,
    /// Only from this sender (display name or full key)
    #[arg(long)]
    pub from: Option<String>,
    #[arg(long)]
    pub mesh: Option<String>,
    /// The newest N messages
    #[arg(long, default_value_t = 50)]
    pub limit: u32,
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: InboxArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    let q = InboxQuery { mesh: args.mesh, unread: args.unread, from: args.from, limit: Some(args.limit) };
    let messages: Vec<InboxMessage> = super::block_on(client.get_query(routes::INBOX, &q))??;
    if args.json {
        return super::print_json(&messages);
    }
    if messages.is_empty() {
        println!("inbox is empty");
    }
    for m in &messages {
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
        println!(
            "{unread}#{:<5} {}  {} ({}) → {to} [{}]: {body}",
            m.id,
            output::time(m.sent_at),
            m.from_name,
            output::short(&m.from),
            m.mesh
        );
    }
    Ok(())
}
