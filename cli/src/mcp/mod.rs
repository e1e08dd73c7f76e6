//! `mesh mcp`: a stdio MCP server for one agent session.
//!
//! It acts as one session and only that one: inside `mesh launch` the launched session (its token
//! from `MESH_SESSION_FILE`); otherwise a session it registers or resumes for the agent that started
//! it (its parent process), named `--name` or after the agent's working directory; the member only
//! with `--as-member`. Tools ([`server`]) go to the daemon over IPC with that session's token; pushes
//! ([`push`]) claim the session's unread messages on the `push` notice channel, so each message is
//! pushed once however often the server restarts, and pushing never marks anything read. Nothing but
//! protocol is written to standard output; logs go to `mcp.<date>.log` in the log directory.

mod push;
mod server;
mod stdio;

use anyhow::Context;

#[derive(clap::Args, Debug)]
pub struct McpArgs {
    /// The session's name (default: the agent's working directory's name); ignored inside `mesh launch`
    #[arg(long)]
    pub name: Option<String>,
    /// The mesh the session acts in (default: the context, or your only mesh)
    #[arg(long)]
    pub mesh: Option<String>,
    /// Act as the member itself instead of a session of it (sees and sends as you)
    #[arg(long, conflicts_with = "name")]
    pub as_member: bool,
}

pub use crate::agent::Identity;

pub fn run(args: McpArgs) -> anyhow::Result<()> {
    let home = super::cmd::home()?;
    let _log = mesh_daemon::lifecycle::init_logging_as("mcp", &home.log_dir, false);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("the async runtime")?;
    runtime.block_on(async move {
        let who =
            crate::agent::Who { name: args.name, mesh: args.mesh, as_member: args.as_member, cwd: None, pid: None };
        let identity = crate::agent::identity(who).await?;
        tracing::info!(session = identity.session.as_deref().unwrap_or("(member)"), "mcp server starting");
        server::serve(identity).await
    })
}
