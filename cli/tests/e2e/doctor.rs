//! `mesh doctor` on a healthy home and on broken ones: each failure named with its fix, exit 1.

use mesh_testkit::BrokerProcess;
use serde_json::Value;

use super::*;

/// `mesh doctor --json`: its exit code and its checks by name.
fn doctor(home: &TestHome) -> (i32, Vec<Value>) {
    let out = home.run(&["doctor", "--json"]);
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("doctor's output is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)));
    assert_eq!(v["ok"], out.status.success(), "{v}");
    (out.status.code().expect("exit code"), v["checks"].as_array().expect("checks").clone())
}

fn check<'a>(checks: &'a [Value], name: &str) -> &'a Value {
    checks.iter().find(|c| c["name"] == name).unwrap_or_else(|| panic!("no check {name}: {checks:?}"))
}

#[test]
fn a_healthy_home_passes_every_check() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "solo"]);
    home.ok(&["daemon", "up"]);
    home.eventually_json("online", &["daemon", "status"], |s| s["meshes"][0]["connection"]["state"] == "online");
    let (code, checks) = doctor(&home);
    assert_eq!(code, 0, "{checks:?}");
    for name in ["daemon", "files", "disk", "service", "outbox", "sessions"] {
        assert_eq!(check(&checks, name)["ok"], true, "{name}: {checks:?}");
    }
    assert!(checks.iter().all(|c| c["ok"] == true && c.get("fix").is_none()), "{checks:?}");
    let text = home.ok(&["doctor"]);
    assert!(text.lines().all(|l| l.starts_with('✔')), "{text}");
}

#[test]
fn a_stopped_daemon_and_loose_file_modes_are_failures_with_their_fix() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "solo"]);
    // No daemon: said, with the command that starts it; the rest still checked.
    let (code, checks) = doctor(&home);
    assert_eq!(code, 1);
    let daemon = check(&checks, "daemon");
    assert_eq!(daemon["ok"], false);
    assert!(daemon["fix"].as_str().is_some_and(|f| f.contains("mesh daemon up")), "{daemon}");
    assert_eq!(check(&checks, "files")["ok"], true);

    home.ok(&["daemon", "up"]);
    let identity = home.paths().identity_path();
    std::fs::set_permissions(&identity, std::os::unix::fs::PermissionsExt::from_mode(0o644)).expect("chmod");
    let (code, checks) = doctor(&home);
    assert_eq!(code, 1);
    let files = check(&checks, "files");
    assert_eq!(files["ok"], false);
    assert!(files["detail"].as_str().is_some_and(|d| d.contains("identity.json is 644")), "{files}");
    assert!(files["fix"].as_str().is_some_and(|f| f.contains("chmod 600")), "{files}");
    let text = String::from_utf8_lossy(&home.run(&["doctor"]).stdout).into_owned();
    assert!(text.contains("✘ files") && text.contains("fix: chmod 600"), "{text}");
}

#[test]
fn a_broker_that_is_down_or_whose_clock_is_off_is_named() {
    // A broker ten minutes ahead.
    let broker = BrokerProcess::start_with(MESH, &["--test-clock-offset-ms", "600000"]);
    let (alice, _bob) = super::sessions::team(&broker);
    let (code, checks) = doctor(&alice);
    assert_eq!(code, 1, "{checks:?}");
    let clock = check(&checks, "clock (team)");
    assert_eq!(clock["ok"], false);
    assert!(clock["detail"].as_str().is_some_and(|d| d.starts_with("+600") || d.starts_with("+599")), "{clock}");
    assert_eq!(check(&checks, "mesh team")["ok"], true);

    let mut broker = broker;
    broker.kill9();
    alice.eventually_json("the link down", &["daemon", "status"], |s| {
        s["meshes"]
            .as_array()
            .is_some_and(|m| m.iter().any(|m| m["name"] == "team" && m["connection"]["state"] != "online"))
    });
    let (code, checks) = doctor(&alice);
    assert_eq!(code, 1);
    let mesh = check(&checks, "mesh team");
    assert_eq!(mesh["ok"], false);
    assert!(mesh["fix"].as_str().is_some_and(|f| f.contains(&broker.url)), "{mesh}");
}

#[test]
fn a_daemon_that_does_not_answer_is_a_failure_not_a_hang() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "solo"]);
    home.ok(&["daemon", "up"]);
    let pid = nix::unistd::Pid::from_raw(home.daemon_pid().expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("stop the daemon");
    let (code, checks) = doctor(&home);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("let it go on");
    assert_eq!(code, 1);
    let daemon = check(&checks, "daemon");
    assert_eq!(daemon["ok"], false);
    assert!(daemon["detail"].as_str().is_some_and(|d| d.contains("no answer within")), "{daemon}");
    assert!(daemon["fix"].as_str().is_some_and(|f| f.contains("mesh daemon down")), "{daemon}");
    assert_eq!(check(&checks, "files")["ok"], true, "the checks that need no daemon still ran");
}

#[test]
fn daemon_down_stops_a_daemon_that_does_not_answer() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "solo"]);
    home.ok(&["daemon", "up"]);
    let pid = nix::unistd::Pid::from_raw(home.daemon_pid().expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("stop the daemon");
    // Doctor's fix for it, followed: the request to stop gets no answer, so the pid is signalled.
    home.ok(&["daemon", "down"]);
    mesh_testkit::eventually("the daemon gone", mesh_testkit::WAIT, || {
        nix::sys::signal::kill(pid, None).is_err().then_some(())
    });
    home.ok(&["daemon", "up"]);
    let (code, _) = doctor(&home);
    assert_eq!(code, 0);
}
