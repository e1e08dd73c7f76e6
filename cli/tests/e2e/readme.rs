//! The README's tour, run as written on a fresh home: every command must work, in order.
//!
//! The daemon is started as `./install.sh` leaves it (`mesh daemon up`); the `mesh` on PATH is the
//! binary under test. A line that starts a session in the background is followed, as a person would,
//! by waiting for that session to be up. The second user's block runs as one script (it keeps a
//! shell variable) with `/tmp/bob` replaced by a temporary home.

use std::process::{Command, Stdio};

use mesh_testkit::{TestHome, eventually};

use super::*;

const README: &str = include_str!(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md"));

/// The `sh` code blocks of the README section that starts with `heading`.
fn blocks_under(heading: &str) -> Vec<String> {
    let section = README.split(heading).nth(1).expect("the README has the section");
    let section = section.split("\n## ").next().unwrap_or_default();
    section.split("```sh\n").skip(1).map(|b| b.split("```").next().unwrap_or_default().to_owned()).collect()
}

fn sh(home: &TestHome, script: &str) -> Command {
    let bin_dir = std::path::Path::new(MESH).parent().expect("bin dir");
    let path = format!("{}:{}", bin_dir.display(), std::env::var("PATH").unwrap_or_default());
    let mut c = Command::new("sh");
    c.args(["-c", script])
        .env("MESH_HOME", home.path())
        .env("PATH", path)
        .env_remove("MESH_SESSION_FILE")
        .env_remove("MESH_CONTEXT")
        .stdin(Stdio::null());
    c
}

#[test]
fn the_readme_tour_works_as_written_on_a_fresh_home() {
    let home = TestHome::new(MESH);
    home.ok(&["daemon", "up"]);
    let blocks = blocks_under("## A 60-second tour");
    assert!(blocks.len() >= 2, "the tour and the second user's block");

    for line in blocks[0].lines().filter(|l| !l.trim().is_empty()) {
        let command = line.split(" #").next().unwrap_or(line).trim();
        if let Some(background) = command.strip_suffix('&') {
            sh(&home, &format!("{background} >/dev/null 2>&1 &")).status().expect("sh");
            let name = background.split("--name ").nth(1).and_then(|r| r.split_whitespace().next()).expect("a name");
            eventually(&format!("session {name} up"), mesh_testkit::WAIT, || {
                let list = home.json(&["session", "list"]);
                list.as_array()?
                    .iter()
                    .any(|s| s["name"] == name && s["live"] == true && s["connection"]["state"] == "online")
                    .then_some(())
            });
            continue;
        }
        let out = sh(&home, command).output().expect("sh");
        assert!(
            out.status.success(),
            "README line failed: {line}\n--- stdout\n{}\n--- stderr\n{}\n--- daemon log\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            home.log_tail(30)
        );
    }
    // What the tour claims happened, happened.
    let inbox = home.json(&["inbox"]);
    assert!(ready_bodies(&inbox).contains(&"hello from a session".to_owned()), "{inbox}");
    assert!(inbox.as_array().expect("array").iter().all(|m| m["read_at"].is_u64()), "acked: {inbox}");

    // `mesh watch` names peers, with their short keys.
    let watched = home.ok(&["watch", "--replay", "--no-follow"]);
    assert!(watched.contains("delivered by reviewer ("), "{watched}");
    assert!(watched.contains("from bot ("), "{watched}");

    // The second user.
    let bob = TestHome::new(MESH);
    let script = blocks[1].replace("/tmp/bob", &bob.path().display().to_string());
    let out = sh(&home, &format!("set -e\n{script}")).output().expect("sh");
    assert!(
        out.status.success(),
        "README block failed:\n{script}\n--- stdout\n{}\n--- stderr\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let reviewer = home.json(&["session", "list"]);
    let reviewer = reviewer.as_array().expect("array").iter().find(|s| s["name"] == "reviewer").expect("reviewer");
    assert_eq!(bob.json(&["peers"]).as_array().expect("array").iter().filter(|p| p["name"] == "bob").count(), 1);

    // The background session ends with its process.
    let pid = reviewer["pid"].as_i64().expect("pid") as i32;
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
}
