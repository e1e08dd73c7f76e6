//! End-to-end tests: the real `mesh` binary, real daemons as detached processes with their own
//! `MESH_HOME`, real brokers on loopback, real SQLite files.

mod addressing;
mod backup;
mod doctor;
mod faults;
mod flows;
mod hooks;
mod inbox;
mod ipc_input;
mod lifecycle;
mod limits;
mod mcp;
mod members;
mod metrics;
mod outbox;
mod output;
mod readme;
mod replicas;
mod service;
mod sessions;
mod setup;
mod tls;
mod tui;
mod webhooks;

pub const MESH: &str = env!("CARGO_BIN_EXE_mesh");

use mesh_testkit::TestHome;
use serde_json::Value;

/// A Python that can `import MODULE` (`MESH_TEST_PYTHON`, else `python3`), or `None` outside CI, where
/// the test says it is skipped and why; under CI a missing one fails the test.
pub fn python_with(module: &str, package: &str) -> Option<String> {
    let python = std::env::var("MESH_TEST_PYTHON").unwrap_or_else(|_| "python3".to_owned());
    let ok = std::process::Command::new(&python)
        .args(["-c", &format!("import {module}")])
        .stderr(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    match (ok, std::env::var_os("CI").is_some()) {
        (true, _) => Some(python),
        (false, false) => {
            eprintln!("skipped: {python} cannot import {module} (pip install {package}); this test did not run");
            None
        }
        (false, true) => panic!("{python} with {module} (`pip install {package}`) is required under CI"),
    }
}

/// The bodies of `home`'s inbox rows that are `ready`.
pub fn ready_bodies(inbox: &Value) -> Vec<String> {
    inbox
        .as_array()
        .expect("inbox is an array")
        .iter()
        .filter(|m| m["status"] == "ready")
        .filter_map(|m| m["body"].as_str().map(str::to_owned))
        .collect()
}

/// Waits until `home`'s inbox holds a ready message with `body`, and returns that row.
pub fn wait_for_message(home: &TestHome, body: &str) -> Value {
    let inbox = home.eventually_json(&format!("{body:?} in the inbox"), &["inbox", "--limit", "1000"], |v| {
        ready_bodies(v).iter().any(|b| b == body)
    });
    inbox.as_array().expect("array").iter().find(|m| m["body"] == body).cloned().expect("row")
}

/// Waits until `home` sees a peer named `name` in its roster.
pub fn wait_for_peer(home: &TestHome, name: &str) {
    home.eventually_json(&format!("peer {name} in the roster"), &["peers"], |v| {
        v.as_array().expect("array").iter().any(|p| p["name"] == name)
    });
}
