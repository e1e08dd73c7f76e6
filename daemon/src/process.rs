//! Is a process still the one we registered? A pid alone is not enough (pids are reused), so a
//! registration records the process's start time and liveness compares both.

/// An identity of a running process: its pid and start time.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProcessId {
    pub pid: u32,
    /// Opaque start marker (Linux: field 22 of `/proc/<pid>/stat`); empty where unavailable.
    pub start: String,
}

/// The running (not zombie) process `pid`, if there is one.
pub fn lookup(pid: u32) -> Option<ProcessId> {
    start_time(pid).map(|start| ProcessId { pid, start })
}

/// Whether `p` is still running: same pid, same start time.
pub fn is_alive(p: &ProcessId) -> bool {
    lookup(p.pid).is_some_and(|now| now.start == p.start)
}

/// The agent a hook or an MCP server serves: the nearest ancestor of this process that is not a
/// shell (agents run their hooks through `sh -c`, sometimes through more than one shell).
pub fn agent_pid() -> u32 {
    agent_pid_of(std::os::unix::process::parent_id())
}

/// `start`, or its nearest ancestor that is not a shell when `start` is one.
fn agent_pid_of(start: u32) -> u32 {
    let mut at = start;
    for _ in 0..16 {
        let shell =
            command_name(at).is_some_and(|n| matches!(n.as_str(), "sh" | "bash" | "dash" | "zsh" | "fish" | "ksh"));
        match parent(at) {
            Some(p) if shell && p > 1 => at = p,
            _ => break,
        }
    }
    at
}

#[cfg(target_os = "linux")]
fn command_name(pid: u32) -> Option<String> {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).ok().map(|s| s.trim().to_owned())
}

#[cfg(not(target_os = "linux"))]
fn command_name(_pid: u32) -> Option<String> {
    None
}

#[cfg(target_os = "linux")]
fn parent(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // After the command name: field 3 (state), then field 4 (ppid).
    stat[stat.rfind(')')? + 1..].split_whitespace().nth(1)?.parse().ok()
}

#[cfg(not(target_os = "linux"))]
fn parent(_pid: u32) -> Option<u32> {
    None
}

#[cfg(target_os = "linux")]
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may contain spaces: parse after the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); starttime is field 22.
    let state = fields.first()?;
    if *state == "Z" || *state == "X" {
        return None;
    }
    fields.get(22 - 3).map(|s| (*s).to_owned())
}

#[cfg(not(target_os = "linux"))]
fn start_time(pid: u32) -> Option<String> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).ok()?);
    nix::sys::signal::kill(pid, None).ok().map(|()| String::new())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_is_alive_and_a_changed_start_is_not() {
        let me = lookup(std::process::id()).expect("we are running");
        assert!(is_alive(&me));
        assert!(!is_alive(&ProcessId { start: format!("{}0", me.start), ..me.clone() }));
    }

    #[test]
    fn the_agent_is_the_nearest_ancestor_that_is_not_a_shell() {
        let me = std::process::id();
        assert_eq!(agent_pid_of(me), me, "a process that is no shell is its own agent");
        if cfg!(target_os = "linux") {
            // A shell (kept alive by a second command) is not an agent: its parent, this test, is.
            let mut shell = std::process::Command::new("sh").args(["-c", "sleep 5; true"]).spawn().expect("sh");
            // Until it has exec'd, the child still carries this process's name.
            let end = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while command_name(shell.id()).as_deref() != Some("sh") && std::time::Instant::now() < end {
                std::thread::yield_now();
            }
            assert_eq!(agent_pid_of(shell.id()), me);
            shell.kill().expect("kill");
            shell.wait().expect("wait");
        }
    }

    #[test]
    fn an_exited_child_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        assert!(lookup(pid).is_none());
    }
}
