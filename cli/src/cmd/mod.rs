//! One module per command family; shared plumbing here.

pub mod broker;
pub mod daemon;
pub mod doctor;
pub mod group;
pub mod hook;
pub mod identity;
pub mod inbox;
pub mod members;
pub mod meshes;
pub mod outbox;
pub mod send;
pub mod service;
pub mod session;
pub mod setup;
pub mod watch;
pub mod webhook;

use anyhow::Context;
use mesh_ipc::{Home, IpcClient};

pub fn home() -> anyhow::Result<Home> {
    Ok(Home::from_env()?)
}

/// A client for this home's daemon, acting as the session named by `MESH_SESSION_FILE` when set.
/// A set but unreadable file is an error: a session's command must never silently act as the member.
pub fn client() -> anyhow::Result<IpcClient> {
    let client = IpcClient::new(&home()?);
    let Some(path) = std::env::var_os(mesh_ipc::SESSION_FILE_ENV).filter(|p| !p.is_empty()) else {
        return Ok(client);
    };
    let token = std::fs::read_to_string(&path).with_context(|| {
        format!(
            "{} is set to {}, which cannot be read: the session has probably ended (unset it to act as the member)",
            mesh_ipc::SESSION_FILE_ENV,
            std::path::Path::new(&path).display()
        )
    })?;
    Ok(client.with_bearer(Some(token.trim().to_owned())))
}

/// The mesh a command names: `--mesh`, else `MESH_CONTEXT` (for one shell or one session). Without
/// either the daemon applies the context set by `mesh use`, or the command's own rule.
/// Inside a session (`MESH_SESSION_FILE` set) `MESH_CONTEXT` is ignored: a session always acts in its
/// own mesh.
pub fn context_mesh(flag: Option<String>) -> anyhow::Result<Option<String>> {
    if flag.is_some() || in_session() {
        return Ok(flag);
    }
    match std::env::var(mesh_ipc::CONTEXT_ENV) {
        Ok(m) if !m.is_empty() => Ok(Some(m)),
        Err(std::env::VarError::NotUnicode(_)) => Err(crate::output::fail(
            "usage",
            format!("{} is not valid UTF-8", mesh_ipc::CONTEXT_ENV),
            Some(format!("set {} to a mesh name from `mesh meshes`, or unset it", mesh_ipc::CONTEXT_ENV)),
        )),
        _ => Ok(None),
    }
}

/// Whether this command runs inside `mesh launch` (as a session).
pub fn in_session() -> bool {
    std::env::var_os(mesh_ipc::SESSION_FILE_ENV).is_some_and(|v| !v.is_empty())
}

/// Whether a person is at the terminal (standard input and error both terminals): only then does a
/// command ask questions.
pub fn interactive() -> bool {
    use std::io::IsTerminal;
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal() && !crate::output::json()
}

/// Asks on the terminal; `None` for an empty answer (or end of input) when there is no default.
pub fn prompt(question: &str, default: Option<&str>) -> anyhow::Result<Option<String>> {
    use std::io::Write;
    let shown = default.map(|d| format!(" [{d}]")).unwrap_or_default();
    let mut err = std::io::stderr();
    let _ = write!(err, "{question}{shown}: ");
    let _ = err.flush();
    let mut line = String::new();
    std::io::stdin().read_line(&mut line).context("reading an answer from the terminal")?;
    let answer = line.trim();
    Ok(if answer.is_empty() { default.map(str::to_owned) } else { Some(answer.to_owned()) })
}

/// The bearer token for the event stream: the session's inside `mesh launch`, else the member's.
pub fn stream_token(home: &Home) -> anyhow::Result<String> {
    let path = match std::env::var_os(mesh_ipc::SESSION_FILE_ENV).filter(|p| !p.is_empty()) {
        Some(p) => std::path::PathBuf::from(p),
        None => home.member_token_path(),
    };
    let token = std::fs::read_to_string(&path).with_context(|| {
        format!("reading the token {} (is the daemon running? it creates the member token)", path.display())
    })?;
    Ok(token.trim().to_owned())
}

/// Runs one future on a single-threaded runtime: every IPC command is one or two requests.
pub fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt =
        tokio::runtime::Builder::new_current_thread().enable_all().build().context("starting the async runtime")?;
    Ok(rt.block_on(f))
}

/// Prints `value` as pretty JSON.
pub fn print_json<T: serde::Serialize>(value: &T) -> anyhow::Result<()> {
    crate::output::print_json(value)
}
