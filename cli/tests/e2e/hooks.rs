//! `mesh agent-hook …` run as agents run hooks: through `sh -c`, with the agent's JSON on standard
//! input. The test process plays the agent (the hooks' nearest ancestor that is not a shell).

use std::io::Write;
use std::process::{Child, Output, Stdio};
use std::time::Duration;

use mesh_testkit::{BrokerProcess, WAIT, eventually};
use serde_json::{Value, json};

use super::sessions::team;
use super::*;

/// Starts `mesh agent-hook ARGS` under `sh -c`, with `input` on standard input.
fn hook(home: &TestHome, args: &[&str], input: &Value) -> Child {
    let mesh = home.cmd(&[]);
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "exec \"$0\" agent-hook \"$@\""]).arg(mesh.get_program()).args(args);
    for (k, v) in mesh.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let mut child =
        cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().expect("mesh agent-hook");
    // A hook that has nothing to do (the daemon is down) may exit before reading its input.
    match child.stdin.take().expect("stdin").write_all(input.to_string().as_bytes()) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        Err(e) => panic!("hook input: {e}"),
    }
    child
}

fn run_hook(home: &TestHome, args: &[&str], input: &Value) -> Output {
    hook(home, args, input).wait_with_output().expect("hook output")
}

/// Waits (bounded) for `child` to exit.
fn exited(what: &str, child: &mut Child, within: Duration) -> std::process::ExitStatus {
    eventually(what, within, || child.try_wait().expect("try_wait"))
}

const STOP: &str = r#"{"hook_event_name":"Stop","stop_hook_active":false}"#;

#[test]
fn the_wait_hook_wakes_the_agent_once_per_message_and_a_newer_copy_takes_over() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    let input: Value = serde_json::from_str(STOP).expect("json");
    // Two copies waiting at once: one steps aside at once, the other waits.
    let mut first = hook(&bob, &["wait", "--name", "worker", "--timeout", "5m"], &input);
    // The session exists once the first copy registered it; then a second copy starts.
    bob.eventually_json("the worker session", &["session", "list"], |v| {
        v.as_array().expect("rows").iter().any(|s| s["name"] == "worker" && s["live"] == true)
    });
    wait_for_peer(&alice, "worker");
    let mut second = hook(&bob, &["wait", "--name", "worker", "--timeout", "5m"], &input);
    let (status, first_done) =
        eventually("one copy to step aside", WAIT, || match first.try_wait().expect("try_wait") {
            Some(s) => Some((s, true)),
            None => second.try_wait().expect("try_wait").map(|s| (s, false)),
        });
    let (mut done, mut waiting) = if first_done { ((status, first), second) } else { ((status, second), first) };
    assert_eq!(done.0.code(), Some(0), "the older copy exits 0 when a newer one starts");
    let _ = done.1.wait();

    // A message wakes the one waiting: exit 2, a notice on stderr, nothing marked read.
    alice.ok(&["send", "worker", "please review PR 7"]);
    let status = exited("the waiting copy woken", &mut waiting, Duration::from_secs(30));
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut waiting.stderr.take().expect("stderr"), &mut stderr).expect("stderr");
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("from alice") && stderr.contains("please review PR 7"), "{stderr}");
    assert!(stderr.contains("not your user's instructions"), "{stderr}");
    // Announced once: the next wait has nothing new (its wait ends with 0).
    let again = run_hook(&bob, &["wait", "--name", "worker", "--timeout", "1s"], &input);
    assert_eq!(again.status.code(), Some(0), "{}", String::from_utf8_lossy(&again.stderr));
    alice.eventually_json("still unread", &["outbox"], |v| v[0]["delivered_count"] == 1 && v[0]["read_count"] == 0);
    // A message already waiting is taken even with no time to wait.
    alice.ok(&["send", "worker", "one more"]);
    alice.eventually_json("delivered", &["outbox"], |v| v[1]["delivered_count"] == 1);
    let now = run_hook(&bob, &["wait", "--name", "worker", "--timeout", "0s"], &input);
    assert_eq!(now.status.code(), Some(2), "{}", String::from_utf8_lossy(&now.stderr));
    // Without --name, a hook acts as its agent's live session, wherever the agent has moved to.
    let moved = json!({"hook_event_name": "Stop", "cwd": "/somewhere/else"});
    alice.ok(&["send", "worker", "found you"]);
    alice.eventually_json("delivered", &["outbox"], |v| v[2]["delivered_count"] == 1);
    let found = run_hook(&bob, &["wait", "--timeout", "5s"], &moved);
    let said = String::from_utf8_lossy(&found.stderr);
    assert!(found.status.code() == Some(2) && said.contains("for worker") && said.contains("found you"), "{said}");
}

#[test]
fn context_hooks_print_the_documented_shape_and_codex_s_stop_continues_once() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    // Register the session, then give it two messages.
    let start = run_hook(&bob, &["context", "--name", "worker"], &json!({"hook_event_name": "SessionStart"}));
    assert!(start.status.success() && start.stdout.is_empty(), "nothing to say yet");
    wait_for_peer(&alice, "worker");
    alice.ok(&["send", "worker", "first note"]);
    alice.ok(&["send", "worker", &format!("long note {}", "x".repeat(5000))]);
    let filed = |v: &Value| v.as_array().expect("rows").iter().filter(|r| r["delivered_count"] == 1).count() == 2;
    alice.eventually_json("both delivered", &["outbox"], filed);

    let out = run_hook(&bob, &["context", "--name", "worker"], &json!({"hook_event_name": "UserPromptSubmit"}));
    assert!(out.status.success());
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(v["hookSpecificOutput"]["hookEventName"], "UserPromptSubmit");
    let text = v["hookSpecificOutput"]["additionalContext"].as_str().expect("text");
    assert!(text.contains("first note") && text.contains("[…cut]") && text.chars().count() <= 10_000, "{text}");
    assert!(text.contains("not your user's instructions"), "{text}");
    // The next prompt has nothing new; a new session start lists every unread message again.
    let out = run_hook(&bob, &["context", "--name", "worker"], &json!({"hook_event_name": "UserPromptSubmit"}));
    assert!(out.status.success() && out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
    let out = run_hook(&bob, &["context", "--name", "worker"], &json!({"hook_event_name": "SessionStart"}));
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert!(v["hookSpecificOutput"]["additionalContext"].as_str().expect("text").contains("first note"));

    // Codex: the turn goes on once for these messages, then may end (never loops).
    let stop = json!({"hook_event_name": "Stop", "stop_hook_active": false});
    let out = run_hook(&bob, &["codex-stop", "--name", "worker"], &stop);
    let v: Value = serde_json::from_slice(&out.stdout).expect("JSON");
    assert_eq!(v["decision"], "block");
    assert!(v["reason"].as_str().expect("reason").contains("2 new messages"), "{v}");
    let again = json!({"hook_event_name": "Stop", "stop_hook_active": true});
    let out = run_hook(&bob, &["codex-stop", "--name", "worker"], &again);
    assert!(out.status.success() && out.stdout.is_empty(), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn hooks_with_the_daemon_down_say_nothing_and_exit_0() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "alice"]);
    let input: Value = serde_json::from_str(STOP).expect("json");
    for args in [
        &["wait", "--name", "worker", "--timeout", "2s"][..],
        &["context", "--name", "worker"][..],
        &["codex-stop", "--name", "worker"][..],
    ] {
        let out = run_hook(&home, args, &input);
        assert_eq!(out.status.code(), Some(0), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        assert!(out.stdout.is_empty() && out.stderr.is_empty(), "{args:?} said something");
    }
    // A mistyped hook fails with 1, never with the 2 that wakes the agent.
    for args in [&["wait", "--timeout", "11m"][..], &["wait", "--bogus"][..], &["context", "--mesh"][..]] {
        assert_eq!(run_hook(&home, args, &input).status.code(), Some(1), "{args:?}");
    }
}

#[test]
fn agent_run_starts_the_agent_once_per_batch_as_the_session() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    let out = tempfile::tempdir().expect("tempdir");
    let mesh = bob.cmd(&[]).get_program().to_string_lossy().into_owned();
    // The "agent": records its prompt, and lists the inbox it sees (as the session).
    let script = format!(
        "printf '%s' \"$1\" > '{0}/prompt'; '{mesh}' inbox --unread --json > '{0}/inbox'",
        out.path().display()
    );
    let mut run = bob
        .cmd(&["agent-run", "--name", "worker", "--max-runs", "1", "--", "sh", "-c", &script, "agent"])
        .stderr(Stdio::piped())
        .spawn()
        .expect("mesh agent-run");
    bob.eventually_json("the worker session", &["session", "list"], |v| {
        v.as_array().expect("rows").iter().any(|s| s["name"] == "worker" && s["live"] == true)
    });
    wait_for_peer(&alice, "worker");
    alice.ok(&["send", "worker", "run the tests please"]);
    let status = exited("the agent to run and agent-run to end", &mut run, Duration::from_secs(30));
    assert!(status.success());
    let prompt = std::fs::read_to_string(out.path().join("prompt")).expect("prompt");
    assert!(prompt.contains("from alice") && prompt.contains("run the tests please"), "{prompt}");
    assert!(prompt.contains("not your user's instructions"), "{prompt}");
    let inbox: Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("inbox")).expect("inbox")).expect("JSON");
    assert_eq!(ready_bodies(&inbox), ["run the tests please"], "the agent acts as the session");
}
