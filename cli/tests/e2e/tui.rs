//! The TUI as a user sees it: the real binary in a real terminal (tmux), driven by keys.

use mesh_testkit::{TestHome, eventually};

use super::*;

/// A private tmux server running one command in a 120×40 window; killed on drop.
pub struct Tmux {
    socket: String,
}

impl Tmux {
    pub fn start(command: &str) -> Tmux {
        let socket = format!("mesh-test-{}-{}", std::process::id(), mesh_proto::now_ms());
        let status = std::process::Command::new("tmux")
            .args(["-L", &socket, "new-session", "-d", "-x", "120", "-y", "40", "-s", "tui", command])
            .status()
            .expect("tmux must be installed (apt-get install tmux)");
        assert!(status.success(), "tmux new-session failed");
        Tmux { socket }
    }

    fn screen(&self) -> String {
        let out =
            std::process::Command::new("tmux").args(["-L", &self.socket, "capture-pane", "-p", "-t", "tui"]).output();
        out.map(|o| String::from_utf8_lossy(&o.stdout).into_owned()).unwrap_or_default()
    }

    pub fn wait_for(&self, what: &str) -> String {
        eventually(&format!("{what:?} on the screen"), mesh_testkit::WAIT, || {
            let s = self.screen();
            s.contains(what).then_some(s)
        })
    }

    pub fn keys(&self, keys: &str) {
        let status = std::process::Command::new("tmux")
            .args(["-L", &self.socket, "send-keys", "-t", "tui", keys])
            .status()
            .expect("tmux send-keys");
        assert!(status.success());
    }
}

impl Drop for Tmux {
    fn drop(&mut self) {
        let _ = std::process::Command::new("tmux").args(["-L", &self.socket, "kill-server"]).status();
    }
}

#[test]
fn a_message_from_another_daemon_appears_live_and_one_key_sends_the_read_receipt() {
    let alice = TestHome::new(MESH);
    alice.ok(&["init", "--name", "alice"]);
    alice.ok(&["daemon", "up"]);
    let bob = TestHome::new(MESH);
    bob.ok(&["init", "--name", "bob"]);
    bob.ok(&["daemon", "up", "--no-embedded"]);
    bob.ok(&["join", alice.ok(&["invite"]).trim()]);
    wait_for_peer(&alice, "bob");

    let tui = Tmux::start(&format!("env MESH_HOME={} {MESH} tui", bob.path().display()));
    tui.wait_for("No messages yet.");
    alice.ok(&["send", "bob", "hello from alice, live"]);
    let screen = tui.wait_for("hello from alice, live");
    assert!(screen.contains("1 unread"), "{screen}");
    tui.keys("a");
    tui.wait_for("0 unread");
    alice.eventually_json("the read receipt at the sender", &["outbox"], |v| v[0]["read_at"].is_u64());

    // The daemon going away is shown, and the screen recovers when it is back.
    bob.ok(&["daemon", "down"]);
    tui.wait_for("unreachable");
    bob.ok(&["daemon", "up", "--no-embedded"]);
    tui.wait_for("daemon ●");
    alice.ok(&["send", "bob", "after the daemon came back"]);
    tui.wait_for("after the daemon came back");

    // The sender's own screen shows it read.
    let sender = Tmux::start(&format!("env MESH_HOME={} {MESH} tui", alice.path().display()));
    sender.wait_for("read 1/1");
    sender.keys("q");
}
