//! `mesh`: the command-line tool. A thin binary: every command parses its arguments, talks to the
//! daemon through `mesh-ipc` (or runs the daemon or broker library in this process), and prints the
//! result for people or, with `--json`, for machines.
//!
//! Exit codes: 0 ok, 1 failure, 2 usage, 3 daemon unreachable.

mod agent;
#[macro_use]
mod output;
mod cmd;
mod mcp;
mod tui;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(name = "mesh", version, about = "Durable, end-to-end encrypted messaging between agent sessions")]
#[command(after_help = "Files live under $MESH_HOME when set, else the XDG directories.\n\
Every command takes --json: one JSON value on stdout, and on failure {\"error\": {\"code\", \"message\", \"hint\"}} on stderr.\n\
Exit codes: 0 ok, 1 failure, 2 usage, 3 daemon unreachable.")]
struct Cli {
    /// Print JSON instead of text (errors too, as {"error": {...}} on stderr)
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Create this member's identity (done automatically on first use)
    Init(cmd::identity::InitArgs),
    /// Run and manage the local daemon
    #[command(subcommand)]
    Daemon(cmd::daemon::DaemonCommand),
    /// Run a broker
    #[command(subcommand)]
    Broker(cmd::broker::BrokerCommand),
    /// Create a mesh on a broker; you become its owner
    Create(cmd::meshes::CreateArgs),
    /// Mint an invite token for a mesh you administer
    Invite(cmd::meshes::InviteArgs),
    /// Join a mesh with an invite token
    Join(cmd::meshes::JoinArgs),
    /// List the meshes you belong to
    Meshes,
    /// Show or set the mesh commands mean when they do not say (MESH_CONTEXT overrides it per shell)
    Use(cmd::meshes::UseArgs),
    /// Change your display name in a mesh (checked by its broker; no restart needed)
    Rename(cmd::meshes::RenameArgs),
    /// Show or change the pin of a mesh's broker certificate (after its operator replaced it)
    Repin(cmd::meshes::RepinArgs),
    /// Show a mesh's limits (sessions and connections per member, connections in all); owners and admins set them
    Limits(cmd::meshes::LimitsArgs),
    /// List the members and sessions you can reach
    Peers(cmd::meshes::PeersArgs),
    /// List a mesh's members: roles, sessions, last seen, who invited whom and when
    Members(cmd::members::MembersArgs),
    /// Remove a member (and its sessions) from a mesh you own or administer
    Remove(cmd::members::RemoveArgs),
    /// Leave a mesh (its owner hands ownership over first: `mesh role NAME owner`)
    Leave(cmd::members::LeaveArgs),
    /// Give a member of a mesh you own another role: admin, member, or owner (hands the mesh over)
    Role(cmd::members::RoleArgs),
    /// List a mesh's outstanding invites (`--all`: every one), with uses left and expiry
    Invites(cmd::members::InvitesArgs),
    /// Manage a mesh you own or administer: a new mesh key
    #[command(subcommand)]
    Mesh(cmd::members::MeshCommand),
    /// Send a message: committed to the outbox at once, delivered by the daemon
    Send(cmd::send::SendArgs),
    /// List received messages (listing never marks them read); ack, flush, delete, replay
    Inbox(cmd::inbox::InboxArgs),
    /// List sent messages and where each stands; retry or abort one
    Outbox(cmd::outbox::OutboxArgs),
    /// Run a command as an agent session with its own identity and connection
    Launch(cmd::session::LaunchArgs),
    /// Agent sessions of this daemon
    #[command(subcommand)]
    Session(cmd::session::SessionCommand),
    /// Join, leave or list groups (@name targets)
    #[command(subcommand)]
    Group(cmd::group::GroupCommand),
    /// Follow your events live: messages, receipts, presence, connection state
    Watch(cmd::watch::WatchArgs),
    /// Check what mesh needs (daemon, files, disk, brokers, clocks, dead letters) and say how to fix it
    Doctor,
    /// POST your messages and receipts to an HTTP endpoint, signed (see docs/webhooks.md)
    #[command(subcommand)]
    Webhook(cmd::webhook::WebhookCommand),
    /// Serve MCP on stdin/stdout for an agent (started by the agent: `claude mcp add mesh -- mesh mcp`)
    Mcp(mcp::McpArgs),
    /// Hooks an agent runs to be woken by, and told of, new messages (see docs/agents.md)
    #[command(subcommand)]
    AgentHook(cmd::hook::HookCommand),
    /// Add `mesh mcp` and the hooks to Claude Code's or Codex's configuration (or --remove them)
    Setup(cmd::setup::SetupArgs),
    /// Run an agent that cannot be woken (`-- codex exec`) once per batch of new messages
    AgentRun(cmd::hook::AgentRunArgs),
    /// A live screen: inbox, sent messages, peers, with actions
    Tui,
    /// Print shell completions
    Completions {
        /// bash, zsh, fish, elvish or powershell
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
}

/// `mesh mcp …` parsed on its own: an agent's long-lived server need not build (and keep in memory)
/// the whole command tree.
#[derive(Parser, Debug)]
#[command(name = "mesh mcp", bin_name = "mesh mcp", about = "Serve MCP on stdin/stdout for an agent")]
struct McpOnly {
    #[command(flatten)]
    args: mcp::McpArgs,
    /// Accepted as everywhere; `mesh mcp` speaks JSON-RPC whatever it says.
    #[arg(long, hide = true)]
    json: bool,
}

fn main() -> ExitCode {
    if std::env::args_os().nth(1).is_some_and(|a| a == "mcp") {
        let only = match McpOnly::try_parse_from(std::env::args_os().skip(1)) {
            Ok(o) => o,
            Err(e) => return usage_error(&e),
        };
        return finish(mcp::run(only.args));
    }
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => return usage_error(&e),
    };
    output::set_json(cli.json);
    let result = match cli.command {
        Command::Init(a) => cmd::identity::init(a),
        Command::Daemon(c) => cmd::daemon::run(c),
        Command::Broker(c) => cmd::broker::run(c),
        Command::Create(a) => cmd::meshes::create(a),
        Command::Invite(a) => cmd::meshes::invite(a),
        Command::Join(a) => cmd::meshes::join(a),
        Command::Meshes => cmd::meshes::list(),
        Command::Use(a) => cmd::meshes::use_mesh(a),
        Command::Rename(a) => cmd::meshes::rename(a),
        Command::Repin(a) => cmd::meshes::repin(a),
        Command::Limits(a) => cmd::meshes::limits(a),
        Command::Peers(a) => cmd::meshes::peers(a),
        Command::Members(a) => cmd::members::members(a),
        Command::Remove(a) => cmd::members::remove(a),
        Command::Leave(a) => cmd::members::leave(a),
        Command::Role(a) => cmd::members::role(a),
        Command::Invites(a) => cmd::members::invites(a),
        Command::Mesh(c) => cmd::members::mesh(c),
        Command::Send(a) => cmd::send::run(a),
        Command::Inbox(a) => cmd::inbox::run(a),
        Command::Outbox(a) => cmd::outbox::run(a),
        Command::Launch(a) => cmd::session::launch(a),
        Command::Session(c) => cmd::session::run(c),
        Command::Group(c) => cmd::group::run(c),
        Command::Watch(a) => cmd::watch::run(a),
        Command::Webhook(c) => cmd::webhook::run(c),
        Command::Doctor => cmd::doctor::run(),
        Command::Mcp(a) => mcp::run(a),
        Command::AgentHook(c) => cmd::hook::run(c),
        Command::Setup(a) => cmd::setup::run(a),
        Command::AgentRun(a) => cmd::hook::agent_run(a),
        Command::Tui => tui::run(),
        Command::Completions { shell } => {
            use clap::CommandFactory;
            // Generated into memory first: a closed pipe (`mesh completions zsh | head`) ends quietly.
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut Cli::command(), "mesh", &mut script);
            output::write_stdout_bytes(&script);
            Ok(())
        }
    };
    finish(result)
}

fn finish(result: anyhow::Result<()>) -> ExitCode {
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => ExitCode::from(output::report_error(&e)),
    }
}

/// Help and version go to stdout (exit 0); a usage error exits 2, as JSON on stderr under `--json`.
fn usage_error(e: &clap::Error) -> ExitCode {
    use clap::error::ErrorKind;
    if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
        output::write_stdout(format_args!("{}", e.render()));
        return ExitCode::SUCCESS;
    }
    // `args_os`: an argument that is not UTF-8 is exactly what may have brought us here.
    if std::env::args_os().any(|a| a == "--json") {
        // clap's message without its usage lines: everything before the first blank line.
        let rendered = e.render().to_string();
        let message = rendered
            .lines()
            .take_while(|l| !l.trim().is_empty())
            .map(str::trim)
            .collect::<Vec<_>>()
            .join(" ")
            .trim_start_matches("error: ")
            .to_owned();
        errln!(
            "{}",
            serde_json::json!({ "error": { "code": "usage", "message": message, "hint": "see `mesh help`" } })
        );
    } else {
        let _ = e.print();
    }
    // An agent reads a hook's exit 2 as "wake up and read this": a mistyped hook must not do that,
    // after every turn.
    if std::env::args_os().nth(1).is_some_and(|a| a == "agent-hook") {
        return ExitCode::from(output::EXIT_FAILURE);
    }
    ExitCode::from(output::EXIT_USAGE)
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Every argument of every command says what it is for.
    #[test]
    fn every_flag_and_argument_has_help_text() {
        fn walk(cmd: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in cmd.get_arguments().filter(|a| !a.is_hide_set()) {
                let id = arg.get_id().as_str();
                if id != "help" && id != "version" && arg.get_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in cmd.get_subcommands() {
                if sub.get_about().is_none() && sub.get_name() != "help" {
                    missing.push(format!("{path} {} (no about)", sub.get_name()));
                }
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&super::Cli::command(), "mesh", &mut missing);
        assert!(missing.is_empty(), "arguments without help: {missing:#?}");
    }
}
