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
    fn an_exited_child_is_not_alive() {
        let mut child = std::process::Command::new("true").spawn().expect("spawn");
        let pid = child.id();
        child.wait().expect("wait");
        assert!(lookup(pid).is_none());
    }
}
