//! Output a program can rely on: `--json` on every command (one JSON value on stdout; on failure one
//! JSON error on stderr with the documented exit code), closed pipes that end a command quietly, and
//! no silent successes.

use std::io::Read;
use std::process::{Command, Stdio};

use mesh_testkit::{TestHome, eventually};
use serde_json::Value;

use super::*;

/// Runs `mesh args… --json` and checks the contract: exit `code`; on success stdout is JSON; on
/// failure stderr is exactly one `{"error": {"code", "message", "hint"}}` object.
fn check_json(home: &TestHome, args: &[&str], code: i32) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = home.run(&all);
    assert_eq!(out.status.code(), Some(code), "{}", home.report(&all, &out));
    if code == 0 {
        serde_json::from_slice(&out.stdout)
            .unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", home.report(&all, &out)))
    } else {
        let v: Value = serde_json::from_slice(&out.stderr)
            .unwrap_or_else(|e| panic!("stderr is not one JSON object ({e}): {}", home.report(&all, &out)));
        let err = &v["error"];
        assert!(err["code"].is_string() && err["message"].is_string(), "{v}");
        assert!(err.get("hint").is_some(), "the hint is always there (null when none): {v}");
        assert!(
            out.stdout.is_empty() || serde_json::from_slice::<Value>(&out.stdout).is_ok(),
            "{}",
            home.report(&all, &out)
        );
        err.clone()
    }
}

#[test]
fn every_command_speaks_json_on_success_and_on_failure() {
    let home = TestHome::new(MESH);
    // Without a daemon: exit 3 and a JSON error saying so, for every command that needs it.
    for args in [&["daemon", "status"][..], &["send", "x", "y"], &["inbox"], &["peers"], &["tui"], &["use"], &["watch"]]
    {
        let err = check_json(&home, args, 3);
        assert_eq!(err["code"], "daemon_unreachable", "{args:?}");
        assert!(err["hint"].as_str().expect("hint").contains("mesh daemon up"), "{args:?}");
    }
    assert_eq!(check_json(&home, &["daemon", "down"], 0)["was_running"], false);
    assert_eq!(check_json(&home, &["init", "--name", "alice"], 0)["name"], "alice");
    let up = check_json(&home, &["daemon", "up"], 0);
    assert_eq!(up["started"], true);
    assert_eq!(check_json(&home, &["daemon", "up"], 0)["started"], false);
    assert!(check_json(&home, &["daemon", "status"], 0)["member"]["key"].is_string());
    let me = up["member"]["key"].as_str().expect("key").to_owned();

    assert_eq!(check_json(&home, &["meshes"], 0).as_array().expect("array").len(), 1);
    assert!(check_json(&home, &["peers"], 0).is_array());
    assert!(check_json(&home, &["use"], 0)["mesh"].is_null());
    let sent = check_json(&home, &["send", &me, "hello me"], 0);
    let outbox_id = sent["outbox_id"].to_string();
    wait_for_message(&home, "hello me");
    let inbox = check_json(&home, &["inbox"], 0);
    let inbox_id = inbox[0]["id"].to_string();
    assert!(check_json(&home, &["outbox"], 0).is_array());
    assert_eq!(check_json(&home, &["inbox", "ack", &inbox_id], 0)["acked"][0].to_string(), inbox_id);
    assert_eq!(check_json(&home, &["inbox", "ack", &inbox_id], 0)["already_read"][0].to_string(), inbox_id);
    assert!(check_json(&home, &["group", "join", "ops"], 0).is_array());
    assert!(check_json(&home, &["group", "list"], 0).is_array());
    assert!(check_json(&home, &["session", "list"], 0).is_array());
    assert!(check_json(&home, &["invite"], 0)["token"].is_string());
    assert!(check_json(&home, &["rename", "alice2"], 0)["my_name"] == "alice2");
    assert_eq!(check_json(&home, &["inbox", "flush"], 0)["deleted"], 1);

    // Failures: the code names what went wrong, and nothing is a silent success.
    assert_eq!(check_json(&home, &["inbox", "ack", "9999"], 1)["code"], "not_found");
    assert_eq!(check_json(&home, &["inbox", "delete", "9999"], 1)["code"], "not_found");
    assert_eq!(check_json(&home, &["inbox", "replay", "9999"], 1)["code"], "not_found");
    assert_eq!(check_json(&home, &["outbox", "retry", "9999"], 1)["code"], "not_found");
    assert_eq!(check_json(&home, &["outbox", "abort", &outbox_id], 1)["code"], "conflict");
    assert_eq!(check_json(&home, &["send", "nobody", "x"], 1)["code"], "unknown_target");
    assert_eq!(check_json(&home, &["send", "@nogroup", "x"], 1)["code"], "unknown_target");
    assert_eq!(check_json(&home, &["send", "*", "x"], 1)["code"], "unknown_target", "no one else to receive it");
    assert_eq!(check_json(&home, &["session", "whoami"], 1)["code"], "unauthorized");
    assert_eq!(check_json(&home, &["use", "nope"], 1)["code"], "unknown_mesh");
    assert_eq!(check_json(&home, &["join", "not-a-token"], 1)["code"], "bad_request");
    assert_eq!(check_json(&home, &["outbox", "--mesh", "nope"], 1)["code"], "unknown_mesh");
    // A message over the limit says the limit and its size.
    let big = "x".repeat(mesh_ipc::MAX_MESSAGE_BYTES + 1);
    let err = check_json(&home, &["send", &me, &big], 1);
    assert_eq!(err["code"], "payload_too_large");
    let message = err["message"].as_str().expect("message");
    assert!(message.contains(&(mesh_ipc::MAX_MESSAGE_BYTES + 1).to_string()) && message.contains("65536"), "{message}");
    // A target no name or key can be, and a name that passes for the key prefix shown beside names.
    assert_eq!(check_json(&home, &["send", "", "x"], 1)["code"], "bad_request");
    assert_eq!(check_json(&home, &["send", &"x".repeat(5000), "x"], 1)["code"], "bad_request");
    assert_eq!(check_json(&home, &["rename", &me[..8]], 1)["code"], "invalid_name");
    assert_eq!(check_json(&home, &["invite", "--expires", "0s"], 2)["code"], "usage");
    // Usage errors: exit 2, JSON too.
    assert_eq!(check_json(&home, &["send"], 2)["code"], "usage");
    assert_eq!(check_json(&home, &["no-such-command"], 2)["code"], "usage");
    // An argument that is not UTF-8 is a usage error, never a crash.
    {
        use std::os::unix::ffi::OsStrExt;
        let bad = std::ffi::OsStr::from_bytes(b"\xff");
        let out = home.cmd(&["send"]).arg(bad).arg("x").output().expect("run");
        assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stderr));
        assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));
        let out = home.cmd(&["send"]).arg(bad).args(["x", "--json"]).output().expect("run");
        let v: Value = serde_json::from_slice(&out.stderr).expect("JSON error");
        assert_eq!((out.status.code(), v["error"]["code"].as_str()), (Some(2), Some("usage")));
    }

    // Streams: one JSON object per line.
    let out = home.run(&["watch", "--replay", "--no-follow", "--json"]);
    assert!(out.status.success());
    let lines = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(lines.lines().count() >= 2, "{lines}");
    for line in lines.lines() {
        serde_json::from_str::<Value>(line).unwrap_or_else(|e| panic!("{e}: {line}"));
    }
    // `launch --json` describes the session on stderr; stdout stays the command's.
    let out = home
        .cmd(&["launch", "--name", "echoer", "--json", "--", "sh", "-c", "echo from-the-command"])
        .output()
        .expect("launch");
    assert!(out.status.success(), "{}", home.report(&["launch"], &out));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "from-the-command\n");
    let described: Value = serde_json::from_slice(&out.stderr).expect("JSON on stderr");
    assert_eq!(described["session"]["name"], "echoer");

    assert_eq!(check_json(&home, &["daemon", "down"], 0)["stopped"], true);

    // `broker serve --json`: its ready line is one JSON object.
    let db = home.path().join("b.db");
    let mut broker = home
        .cmd(&["broker", "serve", "--listen", "127.0.0.1:0", "--json", "--db"])
        .arg(&db)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("broker");
    let mut line = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(broker.stdout.take().expect("stdout")), &mut line)
        .expect("ready line");
    let _ = broker.kill();
    let _ = broker.wait();
    let ready: Value = serde_json::from_str(&line).expect("JSON ready line");
    assert!(ready["listening"].as_str().expect("listening").starts_with("ws://127.0.0.1:"), "{ready}");
}

/// Starts `mesh args…` with stdout on a pipe, reads `bytes` from it, closes it, and returns how the
/// process ended and what it wrote on stderr.
fn read_then_close(home: &TestHome, args: &[&str], bytes: usize) -> (std::process::ExitStatus, String) {
    let mut child = home.cmd(args).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("spawn");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut buf = vec![0; bytes];
    stdout.read_exact(&mut buf).expect("the first bytes");
    drop(stdout);
    let status = eventually(&format!("mesh {args:?} to exit after its reader went away"), mesh_testkit::WAIT, || {
        child.try_wait().expect("wait")
    });
    let mut err = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    (status, err)
}

#[test]
fn a_reader_that_goes_away_ends_a_command_quietly() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "alice"]);
    home.ok(&["daemon", "up"]);
    let me = home.json(&["daemon", "status"])["member"]["key"].as_str().expect("key").to_owned();
    for i in 0..40 {
        home.ok(&["send", &me, &format!("message {i} {}", "padding ".repeat(40))]);
    }
    home.eventually_json("all 40 in", &["inbox", "--limit", "100"], |v| ready_bodies(v).len() == 40);

    // `mesh watch --json | head -N`, having read every event there is: it exits when head does,
    // though it has nothing more to write.
    let settled = home.run(&["watch", "--replay", "--no-follow", "--json"]);
    let events = String::from_utf8_lossy(&settled.stdout).lines().count();
    let mut child = home
        .cmd(&["watch", "--json", "--replay"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("watch");
    let mut reader = std::io::BufReader::new(child.stdout.take().expect("stdout"));
    for _ in 0..events {
        let mut line = String::new();
        std::io::BufRead::read_line(&mut reader, &mut line).expect("an event");
    }
    drop(reader);
    let status =
        eventually("watch to exit after its reader went away", mesh_testkit::WAIT, || child.try_wait().expect("wait"));
    let mut err = String::new();
    child.stderr.take().expect("stderr").read_to_string(&mut err).expect("stderr");
    assert!(status.success() && err.is_empty(), "{status}: {err}");
    // With more to write, the closed pipe ends it at the next write.
    let (status, err) = read_then_close(&home, &["watch", "--json", "--replay"], 10);
    assert!(status.success() && err.is_empty(), "{status}: {err}");
    // `mesh inbox --json | head -c 10`, `mesh inbox | head -c 10`.
    for args in [&["inbox", "--json", "--limit", "100"][..], &["inbox", "--limit", "100"]] {
        let (status, err) = read_then_close(&home, args, 10);
        assert!(status.success() && err.is_empty(), "{args:?}: {status}: {err}");
    }
    // `mesh completions zsh | head`.
    let (status, err) = read_then_close(&home, &["completions", "zsh"], 10);
    assert!(status.success() && err.is_empty(), "{status}: {err}");
}

#[test]
fn the_tui_without_a_daemon_says_so_and_exits_3() {
    let home = TestHome::new(MESH);
    let out = Command::new(MESH).arg("tui").env("MESH_HOME", home.path()).stdin(Stdio::null()).output().expect("tui");
    assert_eq!(out.status.code(), Some(3));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("not running") && err.contains("mesh daemon up"), "{err}");
}

#[test]
fn a_peer_s_terminal_controls_are_shown_never_obeyed_and_json_keeps_the_exact_text() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "alice"]);
    home.ok(&["daemon", "up"]);
    let me = home.json(&["daemon", "status"])["member"]["key"].as_str().expect("key").to_owned();
    let body = "forged\r#1 bob: pay now\x1b[31m\x1b]0;title\x07\x1b]52;c;aGk=\x07\u{202E}txt.exe\u{9b}";
    home.ok(&["send", &me, body]);
    wait_for_message(&home, body);
    for args in [&["inbox"][..], &["watch", "--replay", "--no-follow"], &["outbox"]] {
        let out = home.run(args);
        let raw = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success());
        for bad in ['\x1b', '\x07', '\r', '\u{202E}', '\u{9b}'] {
            assert!(!raw.contains(bad), "{args:?} printed {:?} raw:\n{raw}", bad);
        }
        assert!(raw.contains("\\x0d#1 bob") && raw.contains("\\x1b[31m"), "{args:?}: shown visibly:\n{raw}");
    }
    assert_eq!(home.json(&["inbox"])[0]["body"], body, "--json keeps the exact text");
}
