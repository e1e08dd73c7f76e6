//! The daemon's lifecycle: singleton, detaching, crash recovery, exit codes, file modes.

use std::os::unix::fs::PermissionsExt;

use mesh_testkit::TestHome;

use super::*;

#[test]
fn a_second_up_says_it_is_already_running() {
    let home = TestHome::new(MESH);
    home.ok(&["daemon", "up", "--no-embedded"]);
    let pid = home.daemon_pid();
    let again = home.ok(&["daemon", "up", "--no-embedded"]);
    assert!(again.contains("already running"), "{again}");
    let err = home.fails(&["daemon", "up", "--foreground", "--no-embedded"], 1);
    assert!(err.contains("already running"), "{err}");
    assert_eq!(home.daemon_pid(), pid, "the running daemon was not replaced");
    home.ok(&["daemon", "status"]);
}

#[test]
fn a_daemon_killed_with_sigkill_leaves_a_stale_socket_and_lock_that_the_next_up_recovers() {
    let home = TestHome::new(MESH);
    home.ok(&["daemon", "up"]);
    let first = home.daemon_pid().expect("pid");
    home.kill9_daemon();
    let paths = home.paths();
    assert!(paths.socket_path().exists(), "a killed daemon leaves its socket file behind");
    assert!(paths.lock_path().exists());
    home.fails(&["daemon", "status"], 3);

    home.ok(&["daemon", "up"]);
    let second = home.daemon_pid().expect("pid");
    assert_ne!(first, second);
    let status = home.json(&["daemon", "status"]);
    assert_eq!(status["pid"], second);
    // The local mesh and its embedded broker came back on the same address.
    assert_eq!(status["meshes"].as_array().expect("array").len(), 1);
    home.eventually_json("the local mesh back online", &["daemon", "status"], |v| {
        v["meshes"][0]["connection"]["state"] == "online"
    });
    let me = status["member"]["key"].as_str().expect("key").to_owned();
    home.ok(&["send", &me, "after the crash"]);
    wait_for_message(&home, "after the crash");
}

#[test]
fn without_a_daemon_commands_exit_3_and_down_is_a_no_op() {
    let home = TestHome::new(MESH);
    for args in [&["inbox"][..], &["send", "bob", "hi"], &["daemon", "status"], &["meshes"], &["outbox"]] {
        let err = home.fails(args, 3);
        assert!(err.contains("mesh daemon up"), "{args:?}: {err}");
    }
    let out = home.ok(&["daemon", "down"]);
    assert!(out.contains("not running"), "{out}");
}

#[test]
fn down_stops_the_daemon_and_removes_its_socket() {
    let home = TestHome::new(MESH);
    home.ok(&["daemon", "up", "--no-embedded"]);
    home.ok(&["daemon", "down"]);
    assert!(!home.paths().socket_path().exists());
    home.fails(&["daemon", "status"], 3);
}

fn mode(path: &std::path::Path) -> u32 {
    std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display())).permissions().mode() & 0o777
}

#[test]
fn keys_databases_sockets_and_directories_are_private() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "alice"]);
    home.ok(&["daemon", "up"]);
    let p = home.paths();
    for dir in [&p.config_dir, &p.data_dir, &p.run_dir, &p.log_dir] {
        assert_eq!(mode(dir), 0o700, "{}", dir.display());
    }
    let session = home.launch("worker", None);
    home.ok(&["send", "worker", "makes the databases write their logs"]);
    let with_suffix = |path: std::path::PathBuf, suffix: &str| {
        let mut s = path.into_os_string();
        s.push(suffix);
        std::path::PathBuf::from(s)
    };
    let files = [
        p.identity_path(),
        p.socket_path(),
        p.daemon_db(),
        with_suffix(p.daemon_db(), "-wal"),
        p.embedded_broker_db(),
        with_suffix(p.embedded_broker_db(), "-wal"),
        p.lock_path(),
        p.member_token_path(),
        session.token_file.clone(),
    ];
    for file in files {
        assert_eq!(mode(&file), 0o600, "{}", file.display());
    }
}

#[test]
fn a_deleted_socket_comes_back_and_down_stops_a_daemon_that_cannot_answer() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "alice"]);
    home.ok(&["daemon", "up"]);
    let pid = home.daemon_pid().expect("pid");
    // The socket file deleted: the daemon notices and binds it again.
    std::fs::remove_file(home.paths().socket_path()).expect("delete the socket");
    mesh_testkit::eventually("the daemon reachable again", mesh_testkit::WAIT, || {
        let out = home.run(&["daemon", "status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["pid"] == pid).then_some(())
    });

    // A daemon that holds its lock but cannot answer at all (stopped, its socket gone): `down` still
    // stops it, by the pid in the lock file.
    let nix_pid = nix::unistd::Pid::from_raw(pid);
    nix::sys::signal::kill(nix_pid, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    std::fs::remove_file(home.paths().socket_path()).expect("delete the socket");
    let out = home.run(&["daemon", "down"]);
    assert!(out.status.success(), "{}", home.report(&["daemon", "down"], &out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("does not answer"));
    mesh_testkit::eventually("the stopped daemon gone", mesh_testkit::WAIT, || {
        nix::sys::signal::kill(nix_pid, None).is_err().then_some(())
    });
    // And the home starts again normally.
    home.ok(&["daemon", "up"]);
}
