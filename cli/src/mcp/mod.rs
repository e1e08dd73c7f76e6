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

use anyhow::Context;
use mesh_ipc::api::{LaunchRequest, LaunchResponse};
use mesh_ipc::{IpcClient, routes};

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

/// Who the server acts as, for its tools and its pushes.
#[derive(Clone, Debug)]
pub struct Identity {
    pub client: IpcClient,
    /// A session's name, or `None` for the member.
    pub session: Option<String>,
}

pub fn run(args: McpArgs) -> anyhow::Result<()> {
    let home = super::cmd::home()?;
    let _log = mesh_daemon::lifecycle::init_logging_as("mcp", &home.log_dir, false);
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().context("the async runtime")?;
    runtime.block_on(async move {
        let identity = identity(args).await?;
        tracing::info!(session = identity.session.as_deref().unwrap_or("(member)"), "mcp server starting");
        server::serve(identity).await
    })
}

/// The session this server acts as: see the module's documentation.
async fn identity(args: McpArgs) -> anyhow::Result<Identity> {
    if super::cmd::in_session() {
        let client = super::cmd::client()?;
        let me: mesh_ipc::api::SessionInfo = client.get(routes::SESSION).await?;
        return Ok(Identity { client, session: Some(me.name) });
    }
    let member = super::cmd::client()?;
    if args.as_member {
        return Ok(Identity { client: member, session: None });
    }
    let name = match args.name {
        Some(n) => n,
        None => default_name()?,
    };
    // The agent that started this server: the session lives as long as it does.
    let pid = std::os::unix::process::parent_id();
    let req = LaunchRequest { name: name.clone(), mesh: super::cmd::context_mesh(args.mesh)?, pid, resume: true };
    let launched: LaunchResponse = member.post(routes::SESSIONS, &req).await?;
    let token = std::fs::read_to_string(&launched.token_file)
        .with_context(|| format!("reading the session's token from {}", launched.token_file))?;
    Ok(Identity { client: member.with_bearer(Some(token.trim().to_owned())), session: Some(launched.session.name) })
}

/// The name of the agent's working directory, made a valid display name (`my project!` → `my
/// project`), or `agent` when nothing of it is left.
fn default_name() -> anyhow::Result<String> {
    let dir = std::env::current_dir().context("the working directory")?;
    let base = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    Ok(name_from(&base))
}

fn name_from(base: &str) -> String {
    let kept: String = base
        .chars()
        .map(|c| if c.is_alphanumeric() || matches!(c, '-' | '_' | '.') { c } else { ' ' })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ")
        .chars()
        .take(mesh_proto::names::MAX_NAME_LEN)
        .collect();
    let kept = kept.trim().to_owned();
    if mesh_proto::names::validate_display(&mesh_proto::names::normalize(&kept)).is_ok() {
        mesh_proto::names::normalize(&kept)
    } else {
        "agent".to_owned()
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_working_directory_becomes_a_valid_name() {
        assert_eq!(super::name_from("web-app"), "web-app");
        assert_eq!(super::name_from("my project!"), "my project");
        assert_eq!(super::name_from("  "), "agent");
        assert_eq!(super::name_from("deadbeefcafe"), "agent", "it would look like a key");
        assert_eq!(super::name_from("a\u{202E}b"), "a b");
    }
}
