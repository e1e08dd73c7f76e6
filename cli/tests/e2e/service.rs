//! Service units: one per program and `MESH_HOME`, accepted by systemd itself, restarted always
//! after the network; and the hand-over from a daemon started by hand to the service's.

use mesh_testkit::{TestHome, eventually};

use super::*;

/// Installs with `args` (`--no-start`) under a private XDG config dir; returns the unit's text.
fn install(home: &TestHome, xdg: &std::path::Path, args: &[&str]) -> (std::path::PathBuf, String) {
    let all: Vec<&str> = std::iter::once("--json").chain(args.iter().copied()).collect();
    let out = home.cmd(&all).env("XDG_CONFIG_HOME", xdg).output().expect("run");
    assert!(out.status.success(), "{}", home.report(&all, &out));
    let done: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(done["started"], false);
    let file = std::path::PathBuf::from(done["file"].as_str().expect("file"));
    assert_eq!(
        file.file_name().expect("name").to_string_lossy(),
        format!("{}.service", done["name"].as_str().expect("name"))
    );
    let text = std::fs::read_to_string(&file).expect("unit written");
    (file, text)
}

fn verify(unit: &std::path::Path) {
    match std::process::Command::new("systemd-analyze").arg("verify").arg(unit).output() {
        Ok(verify) => {
            let stderr = String::from_utf8_lossy(&verify.stderr);
            assert!(verify.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
        }
        Err(_) if std::env::var_os("CI").is_none() => {
            eprintln!("skipped: systemd-analyze is not installed, so the unit was not verified by systemd")
        }
        Err(e) => panic!("systemd-analyze is required under CI: {e}"),
    }
}

#[test]
fn each_home_gets_its_own_units_that_systemd_accepts_and_uninstall_removes_them() {
    let (one, two) = (TestHome::new(MESH), TestHome::new(MESH).with_env("SSL_CERT_FILE", "/etc/company-ca.pem"));
    let xdg = tempfile::tempdir().expect("tempdir");
    let (unit_one, text) = install(&one, xdg.path(), &["daemon", "install-service", "--no-start"]);
    assert!(text.contains(&format!("ExecStart={MESH} daemon up --foreground --replace")), "{text}");
    assert!(text.contains(&format!("Environment=MESH_HOME={}", one.path().display())), "{text}");
    for line in ["Wants=network-online.target", "After=network-online.target", "Restart=always", "StartLimitBurst="] {
        assert!(text.contains(line), "{line} missing:\n{text}");
    }
    let (unit_two, text_two) = install(&two, xdg.path(), &["daemon", "install-service", "--no-start"]);
    // The service's daemon trusts the same authorities as the shell that installed it.
    assert!(text_two.contains("Environment=SSL_CERT_FILE=/etc/company-ca.pem"), "{text_two}");
    assert_ne!(unit_one, unit_two, "two homes, two units");
    assert!(unit_one.exists() && unit_two.exists());
    verify(&unit_one);

    // The broker's unit, with the serve options checked before anything is written; a relative
    // database path made absolute, and the create token kept off the command line.
    let args = [
        "broker",
        "install-service",
        "--no-start",
        "--",
        "--listen",
        "0.0.0.0:7777",
        "--db",
        "rel.db",
        "--create-token",
        "s3cr3t",
    ];
    let (broker_unit, text) = install(&one, xdg.path(), &args);
    let cwd = std::env::current_dir().expect("cwd");
    let exec = format!("ExecStart={MESH} broker serve --listen 0.0.0.0:7777 --db {}", cwd.join("rel.db").display());
    assert!(text.lines().any(|l| l == exec), "{exec}\n{text}");
    assert!(text.contains("Environment=MESH_BROKER_CREATE_TOKEN=s3cr3t") && !text.contains("--create-token"), "{text}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&broker_unit).expect("unit").permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "a unit may hold a token");
    verify(&broker_unit);
    // The same home with a trailing slash is the same service.
    let mut slash = one.path().display().to_string();
    slash.push('/');
    let out = one
        .cmd(&["--json", "daemon", "install-service", "--no-start"])
        .env("MESH_HOME", &slash)
        .env("XDG_CONFIG_HOME", xdg.path())
        .output()
        .expect("run");
    let again: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(std::path::PathBuf::from(again["file"].as_str().expect("file")), unit_one);
    let out = one
        .cmd(&["broker", "install-service", "--no-start", "--", "--lisen", "x"])
        .env("XDG_CONFIG_HOME", xdg.path())
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
    // TLS files are loaded before a unit is written: a missing one, or half a self-signed pair.
    let half = tempfile::tempdir().expect("dir");
    std::fs::write(half.path().join("broker-tls-cert.pem"), "kept").expect("half");
    let db = half.path().join("broker.db");
    for serve in [
        vec!["--tls-cert", "/nonexistent/cert.pem", "--tls-key", "/nonexistent/key.pem"],
        vec!["--db", db.to_str().expect("utf-8"), "--tls-self-signed", "localhost"],
    ] {
        let args: Vec<&str> = ["broker", "install-service", "--no-start", "--"].into_iter().chain(serve).collect();
        let out = two.cmd(&args).env("XDG_CONFIG_HOME", xdg.path()).output().expect("run");
        assert_eq!(out.status.code(), Some(1), "{}", two.report(&args, &out));
    }
    // A service on port 0 would move after every restart, and invites carry its address.
    let args = ["broker", "install-service", "--no-start", "--", "--listen", "127.0.0.1:0"];
    let out = two.cmd(&args).env("XDG_CONFIG_HOME", xdg.path()).output().expect("run");
    assert_eq!(out.status.code(), Some(2), "{}", two.report(&args, &out));

    for (home, args, unit) in [
        (&one, ["daemon", "uninstall-service"], &unit_one),
        (&two, ["daemon", "uninstall-service"], &unit_two),
        (&one, ["broker", "uninstall-service"], &broker_unit),
    ] {
        let out = home.cmd(&args).env("XDG_CONFIG_HOME", xdg.path()).output().expect("run");
        assert!(out.status.success(), "{}", home.report(&args, &out));
        assert!(!unit.exists());
    }
}

#[test]
fn a_service_started_while_a_daemon_runs_takes_over_from_it() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "alice"]);
    home.ok(&["daemon", "up"]);
    let by_hand = home.daemon_pid().expect("pid");
    // What the unit runs, its standard error going where a service manager's goes: not a terminal.
    let journal = tempfile::NamedTempFile::new().expect("journal file");
    let mut service = home
        .cmd(&["daemon", "up", "--foreground", "--replace"])
        .stdout(std::process::Stdio::null())
        .stderr(journal.reopen().expect("journal"))
        .spawn()
        .expect("spawn");
    let pid = service.id() as i32;
    eventually("the service's daemon to answer", mesh_testkit::WAIT, || {
        let out = home.run(&["daemon", "status", "--json"]);
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        (v["pid"] == pid).then_some(())
    });
    eventually("the daemon started by hand to exit", mesh_testkit::WAIT, || {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(by_hand), None).is_err().then_some(())
    });
    assert!(service.try_wait().expect("wait").is_none(), "the service's daemon keeps running");
    home.ok(&["daemon", "down"]);
    service.wait().expect("the service's daemon exits on down");
    let logged = std::fs::read_to_string(journal.path()).expect("journal");
    assert!(logged.contains("daemon starting"), "{logged}");
    assert!(!logged.contains('\x1b'), "no colour codes where no terminal reads them:\n{logged}");
    let file_logs = home.log_tail(200);
    assert!(!file_logs.is_empty() && !file_logs.contains('\x1b'), "no colour codes in log files");
}

/// A broker's database address goes into its unit only as `serve` can use it: a PostgreSQL address
/// in the unit's environment (never on the command line), a `MESH_BROKER_DB` file made absolute;
/// an address the broker would refuse, a misspelt or quoted one, or a line break, refused before
/// anything is written, and never echoed. The unit restarts a broker however long its database is
/// away.
#[test]
fn a_broker_unit_carries_its_database_only_as_serve_can_use_it() {
    let home = TestHome::new(MESH);
    let xdg = tempfile::tempdir().expect("tempdir");
    let address = "host=127.0.0.1 port=5432 dbname=mesh user=app password='S3cret PW'";
    let args = ["broker", "install-service", "--no-start", "--", "--listen", "127.0.0.1:7777", "--db", address];
    let (unit, text) = install(&home, xdg.path(), &args);
    assert!(text.contains("Environment=\"MESH_BROKER_DB=host=127.0.0.1") && !text.contains("--db"), "{text}");
    assert!(text.contains("StartLimitIntervalSec=0"), "{text}");
    verify(&unit);

    let empty = tempfile::tempdir().expect("a working directory");
    for (db, code) in [
        ("postgres//app:S3cret@127.0.0.1/mesh", 2),
        ("\"postgres://app:S3cret@127.0.0.1/mesh\"", 2),
        ("host 127.0.0.1 password S3cret", 2),
        ("postgres://app:S3c@ret@127.0.0.1/mesh", 2),
        ("postgres://app:S3cret@127.0.0.1/mesh?sslmode=verify-full", 2),
        ("host=127.0.0.1 dbname=mesh\nExecStartPre=/bin/true password=S3cret", 2),
        ("host=127.0.0.1 dbname=mesh\nuser=app password=S3cret", 1),
    ] {
        for command in
            [&["broker", "install-service", "--no-start", "--", "--db", db][..], &["broker", "serve", "--db", db]]
        {
            let out =
                home.cmd(command).env("XDG_CONFIG_HOME", xdg.path()).current_dir(empty.path()).output().expect("run");
            let said = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
            if command[1] == "serve" && db.contains('\n') {
                // serve takes a libpq address with a line break as it is; only a unit cannot.
                continue;
            }
            assert_eq!(out.status.code(), Some(code), "{db:?} {command:?}: {said}");
            assert!(!said.contains("S3cret") && !said.contains("S3c@"), "{db:?} echoed: {said}");
        }
        assert_eq!(std::fs::read_to_string(&unit).expect("unit"), text, "{db:?}: the unit is as it was");
    }
    assert_eq!(std::fs::read_dir(empty.path()).expect("dir").count(), 0, "no file made of an address");

    // A file named by MESH_BROKER_DB alone is the service's database, made absolute.
    let out = home
        .cmd(&["--json", "broker", "install-service", "--no-start", "--", "--listen", "127.0.0.1:7777"])
        .env("XDG_CONFIG_HOME", xdg.path())
        .env("MESH_BROKER_DB", "from-env.db")
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = std::fs::read_to_string(&unit).expect("unit");
    let cwd = std::env::current_dir().expect("cwd");
    assert!(text.contains(&format!("--db {}", cwd.join("from-env.db").display())), "{text}");
}
