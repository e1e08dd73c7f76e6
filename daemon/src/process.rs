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

/// Whether `ancestor` is `pid` itself or one of its ancestors (its parent, the parent's parent, …).
/// Where the process tree cannot be read, only `pid` itself.
pub fn is_self_or_ancestor(ancestor: u32, pid: u32) -> bool {
    let mut at = pid;
    // A process tree is shallow; the bound keeps a malformed one from looping.
    for _ in 0..64 {
        if at == ancestor {
            return true;
        }
        match parent(at) {
            Some(p) if p != 0 && p != at => at = p,
            _ => return false,
        }
    }
    false
}

/// The agent a hook or an MCP server serves: the nearest ancestor of this process that is not a
/// shell (agents run their hooks through `sh -c`, sometimes through more than one shell).
pub fn agent_pid() -> u32 {
    let mut at = std::os::unix::process::parent_id();
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
    fn a_process_s_ancestors_are_found_and_others_are_not() {
        let me = std::process::id();
        assert!(is_self_or_ancestor(me, me));
        if cfg!(target_os = "linux") {
            assert!(is_self_or_ancestor(std::os::unix::process::parent_id(), me), "the parent");
            assert!(is_self_or_ancestor(1, me), "init is everyone's ancestor");
        }
        let mut child = std::process::Command::new("sleep").arg("5").spawn().expect("spawn");
        assert!(!is_self_or_ancestor(child.id(), me), "a child is no ancestor");
        if cfg!(target_os = "linux") {
            assert!(is_self_or_ancestor(me, child.id()), "we are the child's parent");
        }
        child.kill().expect("kill");
        child.wait().expect("wait");
    }

    #[test]
    fn an_exited_child_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        assert!(lookup(pid).is_none());
    }
}
