//! `mesh launch` and `mesh session`.

use std::os::unix::process::CommandExt;

use anyhow::{Context, bail};
use mesh_ipc::api::{LaunchRequest, LaunchResponse, SessionInfo};
use mesh_ipc::routes;

use crate::output;

#[derive(clap::Args, Debug)]
pub struct LaunchArgs {
    /// The session's name, as others address it
    #[arg(long)]
    pub name: String,
    /// The mesh the session lives in (default: MESH_CONTEXT, then `mesh use`, else your only mesh)
    #[arg(long)]
    pub mesh: Option<String>,
    /// The command to run as the session
    #[arg(last = true, required = true, num_args = 1..)]
    pub command: Vec<std::ffi::OsString>,
}

#[derive(clap::Subcommand, Debug)]
pub enum SessionCommand {
    /// List the sessions of this daemon, live or not
    List,
    /// Show the session this command runs in
    Whoami,
}

/// Registers this process as session NAME, then replaces it with the command: the command keeps this
/// pid, which is how the daemon knows the session is live, and gets `MESH_SESSION_FILE`.
pub fn launch(args: LaunchArgs) -> anyhow::Result<()> {
    if super::in_session() {
        bail!("already inside a session ({} is set); a session cannot launch another", mesh_ipc::SESSION_FILE_ENV);
    }
    let (program, rest) = args.command.split_first().context("no command to run")?;
    // A command that cannot start is refused before a session is registered for it.
    if !runnable(program) {
        return Err(crate::output::fail(
            "not_found",
            format!("no command {:?} to run (not an executable file, nor found on PATH)", program.to_string_lossy()),
            None,
        ));
    }
    let client = super::client()?;
    let req = LaunchRequest {
        name: args.name,
        mesh: super::context_mesh(args.mesh)?,
        pid: std::process::id(),
        resume: false,
    };
    let launched: LaunchResponse = super::block_on(client.post(routes::SESSIONS, &req))??;
    if crate::output::json() {
        // Standard output belongs to the command; the session is described on standard error.
        errln!("{}", serde_json::json!({ "session": launched.session }));
    }
    let err = std::process::Command::new(program)
        .args(rest)
        .env(mesh_ipc::SESSION_FILE_ENV, &launched.token_file)
        .env("MESH_SESSION_NAME", &launched.session.name)
        // The session acts in its own mesh: a context chosen for the shell does not follow it in.
        .env_remove(mesh_ipc::CONTEXT_ENV)
        .exec();
    // Still here: the command could not start. End the session rather than leave it live.
    let ended =
        client.clone().with_bearer(std::fs::read_to_string(&launched.token_file).ok().map(|t| t.trim().to_owned()));
    let _ = super::block_on(ended.post::<_, SessionInfo>(routes::SESSION_END, &serde_json::json!({})));
    Err(err).with_context(|| format!("running {:?}", program.to_string_lossy()))
}

/// Whether `program` names an executable file, directly (with a `/`) or on `PATH`.
fn runnable(program: &std::ffi::OsStr) -> bool {
    use std::os::unix::ffi::OsStrExt;
    use std::os::unix::fs::PermissionsExt;
    let executable =
        |p: &std::path::Path| std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0);
    if program.as_bytes().contains(&b'/') {
        return executable(std::path::Path::new(program));
    }
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|dir| executable(&dir.join(program))))
}

pub fn run(cmd: SessionCommand) -> anyhow::Result<()> {
    let client = super::client()?;
    match cmd {
        SessionCommand::List => {
            let sessions: Vec<SessionInfo> = super::block_on(client.get(routes::SESSIONS))??;
            if crate::output::json() {
                return super::print_json(&sessions);
            }
            if sessions.is_empty() {
                outln!("no sessions yet; start one with `mesh launch --name NAME -- COMMAND`");
            }
            for s in &sessions {
                print_session(s);
            }
        }
        SessionCommand::Whoami => {
            let s: SessionInfo = super::block_on(client.get(routes::SESSION))??;
            if crate::output::json() {
                return super::print_json(&s);
            }
            print_session(&s);
        }
    }
    Ok(())
}

fn print_session(s: &SessionInfo) {
    let state = match (&s.connection, s.live) {
        (Some(c), true) => format!("live (pid {}), broker link {}", s.pid.unwrap_or_default(), c.state.as_str()),
        _ => s.ended_at.map_or_else(|| "not running".to_owned(), |t| format!("ended {}", output::ago(t))),
    };
    outln!("{}", output::clean(&format!("{:<20} mesh {:<16} {}  {state}", s.name, s.mesh, s.key)));
}
