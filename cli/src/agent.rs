//! Which session an agent's MCP server or hook acts as: inside `mesh launch` the launched session;
//! otherwise the session named `--name` (default: the agent's working directory's name) of the agent
//! that runs it — resumed when that agent already has it live, registered for the agent (its nearest
//! ancestor that is not a shell) when not; the member only when asked (`--as-member`).

use std::path::{Path, PathBuf};

use anyhow::Context;
use mesh_ipc::api::{LaunchRequest, LaunchResponse, SessionInfo};
use mesh_ipc::{IpcClient, routes};

/// Who an MCP server or a hook acts as.
#[derive(Clone, Debug)]
pub struct Identity {
    pub client: IpcClient,
    /// A session's name, or `None` for the member.
    pub session: Option<String>,
    /// The session's token file (`MESH_SESSION_FILE` for processes acting as it), when known.
    pub token_file: Option<PathBuf>,
}

/// What the command line (or the hook's input) says about it.
#[derive(Clone, Debug, Default)]
pub struct Who {
    pub name: Option<String>,
    pub mesh: Option<String>,
    pub as_member: bool,
    /// The agent's working directory, when the agent says (hooks); else this process's.
    pub cwd: Option<PathBuf>,
    /// The process the session lives as long as; default: the agent ([`mesh_daemon::process::agent_pid`]).
    pub pid: Option<u32>,
}

pub async fn identity(who: Who) -> anyhow::Result<Identity> {
    if crate::cmd::in_session() {
        let client = crate::cmd::client()?;
        let me: SessionInfo = client.get(routes::SESSION).await?;
        let file = std::env::var_os(mesh_ipc::SESSION_FILE_ENV).map(PathBuf::from);
        return Ok(Identity { client, session: Some(me.name), token_file: file });
    }
    let member = crate::cmd::client()?;
    if who.as_member {
        return Ok(Identity { client: member, session: None, token_file: None });
    }
    let pid = who.pid.unwrap_or_else(mesh_daemon::process::agent_pid);
    let (name, mesh) = match who.name {
        Some(n) => (n, crate::cmd::context_mesh(who.mesh)?),
        None => match agents_session(&member, pid).await? {
            // The agent has a session already (its MCP server or an earlier hook made it): that one,
            // whatever directory the agent has moved to since.
            Some(live) => (live.name, Some(live.mesh)),
            None => {
                let dir = match who.cwd {
                    Some(d) => d,
                    None => std::env::current_dir().context("the working directory")?,
                };
                (default_name(&dir), crate::cmd::context_mesh(who.mesh)?)
            }
        },
    };
    let req = LaunchRequest { name, mesh, pid, resume: true };
    let launched: LaunchResponse = member.post(routes::SESSIONS, &req).await?;
    let token = std::fs::read_to_string(&launched.token_file)
        .with_context(|| format!("reading the session's token from {}", launched.token_file))?;
    Ok(Identity {
        client: member.with_bearer(Some(token.trim().to_owned())),
        session: Some(launched.session.name),
        token_file: Some(PathBuf::from(launched.token_file)),
    })
}

/// The live session whose process is `pid`, when there is exactly one.
async fn agents_session(member: &IpcClient, pid: u32) -> anyhow::Result<Option<SessionInfo>> {
    let all: Vec<SessionInfo> = member.get(routes::SESSIONS).await?;
    let mut mine = all.into_iter().filter(|s| s.live && s.pid == Some(pid));
    Ok(match (mine.next(), mine.next()) {
        (Some(only), None) => Some(only),
        _ => None,
    })
}

/// The name of the agent's working directory, made a valid display name (`my project!` → `my
/// project`), or `agent` when nothing of it is left.
pub fn default_name(dir: &Path) -> String {
    let base = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    name_from(&base)
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
    let kept = mesh_proto::names::normalize(kept.trim());
    if mesh_proto::names::validate_display(&kept).is_ok() { kept } else { "agent".to_owned() }
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
