//! The inbox and the event stream: isolation between the member and its sessions, replay after a
//! disconnect, an outside SSE client, failed rows and replay, read receipts, scoped deletes.

use std::collections::BTreeSet;

use mesh_testkit::{BrokerProcess, TestHome, eventually};
use serde_json::Value;

use super::sessions::team;
use super::*;

/// Runs `mesh watch --replay --no-follow --json` with `cmd` and returns the events.
fn replay_events(mut cmd: std::process::Command) -> Vec<Value> {
    let out = cmd.output().expect("mesh watch");
    assert!(out.status.success(), "mesh watch failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).expect("an event per line")).collect()
}

fn message_bodies(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .filter(|e| e["kind"] == "message")
        .filter_map(|e| e["data"]["body"].as_str().map(str::to_owned))
        .collect()
}

fn bodies(inbox: &Value) -> BTreeSet<String> {
    ready_bodies(inbox).into_iter().collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| (*s).to_owned()).collect()
}

const WATCH: &[&str] = &["watch", "--replay", "--no-follow", "--json"];

#[test]
fn each_identity_s_inbox_and_stream_hold_exactly_its_own_messages() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    let s1 = alice.launch("s1", None);
    let s2 = alice.launch("s2", None);
    s1.ok(&["group", "join", "@ops"]);
    eventually("the group join confirmed", mesh_testkit::WAIT, || {
        (s1.json(&["group", "list"])[0]["synced"] == true).then_some(())
    });
    wait_for_peer(&bob, "s1");
    wait_for_peer(&bob, "s2");
    for (to, body) in
        [("alice", "to-member"), ("s1", "to-s1"), ("s2", "to-s2"), ("*", "to-everyone"), ("@ops", "to-ops")]
    {
        bob.ok(&["send", to, body, "--mesh", "team"]);
    }
    let expected_member = set(&["to-member", "to-everyone"]);
    let expected_s1 = set(&["to-s1", "to-everyone", "to-ops"]);
    let expected_s2 = set(&["to-s2", "to-everyone"]);

    let member_inbox = alice.eventually_json("the member's messages", &["inbox"], |v| bodies(v) == expected_member);
    let s1_inbox = eventually("s1's messages", mesh_testkit::WAIT, || {
        let v = s1.json(&["inbox"]);
        (bodies(&v) == expected_s1).then_some(v)
    });
    let s2_inbox = eventually("s2's messages", mesh_testkit::WAIT, || {
        let v = s2.json(&["inbox"]);
        (bodies(&v) == expected_s2).then_some(v)
    });
    // Exactly: no extra rows, no copy seen twice.
    assert_eq!(member_inbox.as_array().expect("array").len(), 2);
    assert_eq!(s1_inbox.as_array().expect("array").len(), 3);
    assert_eq!(s2_inbox.as_array().expect("array").len(), 2);

    // The streams carry the same, and nothing of the others.
    for (events, expected) in [
        (replay_events(alice.cmd(WATCH)), &expected_member),
        (replay_events(s1.cmd(WATCH)), &expected_s1),
        (replay_events(s2.cmd(WATCH)), &expected_s2),
    ] {
        let got = message_bodies(&events);
        assert_eq!(got.len(), expected.len(), "{got:?}");
        assert_eq!(&got.into_iter().collect::<BTreeSet<_>>(), expected);
    }
    // The member's explicit all-sessions view sees all seven copies; a session may not ask for it.
    let mut all = alice.cmd(WATCH);
    all.arg("--all");
    assert_eq!(message_bodies(&replay_events(all)).len(), 7);
    let out = s1.cmd(&["watch", "--all", "--no-follow"]).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("401"));
}

#[test]
fn a_watcher_that_was_away_gets_every_missed_event_once_and_in_order() {
    let alice = TestHome::new(MESH);
    alice.ok(&["init", "--name", "alice"]);
    alice.ok(&["daemon", "up"]);
    let bob = TestHome::new(MESH);
    bob.ok(&["init", "--name", "bob"]);
    bob.ok(&["daemon", "up", "--no-embedded"]);
    bob.ok(&["join", alice.ok(&["invite"]).trim()]);
    wait_for_peer(&alice, "bob");

    // The watcher saw everything up to here, then went away.
    let seen = replay_events(bob.cmd(WATCH));
    let last = seen.last().map_or(0, |e| e["id"].as_i64().expect("id"));
    let sent: Vec<String> = (0..100).map(|i| format!("missed {i:03}")).collect();
    for body in &sent {
        alice.ok(&["send", "bob", body]);
    }
    bob.eventually_json("all 100 filed", &["inbox", "--limit", "1000"], |v| ready_bodies(v).len() == 100);

    // Back with Last-Event-ID: every one, once, in order.
    let mut again = bob.cmd(&["watch", "--no-follow", "--json", "--since", &last.to_string()]);
    again.stdin(std::process::Stdio::null());
    let resumed = replay_events(again);
    assert_eq!(message_bodies(&resumed), sent);
    let ids: Vec<i64> = resumed.iter().map(|e| e["id"].as_i64().expect("id")).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]) && ids[0] > last, "ids increase from after {last}: {ids:?}");
}

#[test]
fn curl_reads_the_stream_with_a_token_and_gets_401_without() {
    let alice = TestHome::new(MESH);
    alice.ok(&["init", "--name", "alice"]);
    alice.ok(&["daemon", "up"]);
    alice.ok(&["send", "alice", "seen by curl"]);
    wait_for_message(&alice, "seen by curl");
    let socket = alice.paths().socket_path();
    let curl = |extra: &[&str]| {
        std::process::Command::new("curl")
            .args(["-sN", "--max-time", "2", "--unix-socket"])
            .arg(&socket)
            .args(extra)
            .arg("http://localhost/v1/events")
            .output()
            .expect("curl")
    };
    let out = curl(&["-w", "%{http_code}"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.ends_with("401") && text.contains("unauthorized"), "{text}");

    let token = std::fs::read_to_string(alice.paths().member_token_path()).expect("member token");
    let auth = format!("Authorization: Bearer {}", token.trim());
    let out = curl(&["-H", &auth, "-H", "Last-Event-ID: 0"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("event: message"), "{text}");
    assert!(text.contains("seen by curl"), "{text}");
    assert!(text.lines().any(|l| l.starts_with("id: ")), "{text}");
    let bad = curl(&["-H", &auth, "-H", "Last-Event-ID: yesterday", "-w", "%{http_code}"]);
    assert!(String::from_utf8_lossy(&bad.stdout).ends_with("400"));
    // The header and ?since= follow one rule: negative is refused by both, the largest id is no
    // bogus resync (it resumes from the newest event, with nothing to replay).
    let bad = std::process::Command::new("curl")
        .args(["-s", "--max-time", "2", "--unix-socket"])
        .arg(&socket)
        .args(["-H", &auth, "-w", "%{http_code}", "http://localhost/v1/events?since=-5"])
        .output()
        .expect("curl");
    assert!(String::from_utf8_lossy(&bad.stdout).ends_with("400"), "{}", String::from_utf8_lossy(&bad.stdout));
    let out = curl(&["-H", &auth, "-H", "Last-Event-ID: 9223372036854775807"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(!text.contains("resync") && !text.contains("event: message"), "{text}");
}

#[test]
fn a_row_that_failed_to_decrypt_is_kept_and_replay_files_it() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    bob.ok(&["daemon", "down"]);
    let out = bob.cmd(&["daemon", "up", "--no-embedded"]).env("MESH_FAULT_DECRYPT_FAILURES", "1").output().expect("up");
    assert!(out.status.success());
    alice.ok(&["send", "bob", "decrypts on the second try"]);
    let inbox = bob.eventually_json("a failed row", &["inbox"], |v| {
        v.as_array().expect("array").iter().any(|m| m["status"] == "failed")
    });
    let row = inbox[0].clone();
    assert!(row["error"].as_str().expect("reason").starts_with("decrypt_failed"), "{row}");
    assert!(row["body"].is_null());
    let replayed = bob.json(&["inbox", "replay", &row["id"].to_string()]);
    assert_eq!(replayed["status"], "ready");
    assert_eq!(replayed["body"], "decrypts on the second try");
    // Replaying a filed row again is harmless.
    assert_eq!(bob.json(&["inbox", "replay", &row["id"].to_string()])["status"], "ready");
}

#[test]
fn read_receipts_travel_back_to_the_sender_across_daemons() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    alice.ok(&["send", "bob", "first"]);
    let first = wait_for_message(&bob, "first");
    let waiter = {
        let cmd = alice.cmd(&["send", "bob", "second", "--wait", "read", "--timeout", "30s", "--json"]);
        std::thread::spawn(move || {
            let mut cmd = cmd;
            cmd.output().expect("send --wait read")
        })
    };
    wait_for_message(&bob, "second");
    assert!(alice.json(&["outbox"])[0]["read_at"].is_null(), "nothing is read before the ack");
    bob.ok(&["inbox", "ack", &first["id"].to_string()]);
    alice.eventually_json("a read receipt for the first", &["outbox"], |v| v[0]["read_at"].is_u64());
    assert!(bob.json(&["inbox", "--unread"]).as_array().expect("array").len() == 1);
    bob.ok(&["inbox", "ack", "--all"]);
    let out = waiter.join().expect("thread");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let waited: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(waited["wait"]["reached"], true);
    assert_eq!(waited["wait"]["read_count"], 1);
}

#[test]
fn flush_and_delete_act_only_on_the_caller_s_own_rows() {
    let alice = TestHome::new(MESH);
    alice.ok(&["init", "--name", "alice"]);
    alice.ok(&["daemon", "up"]);
    let s1 = alice.launch("s1", None);
    let s2 = alice.launch("s2", None);
    alice.ok(&["send", "s1", "for s1"]);
    alice.ok(&["send", "s2", "for s2"]);
    alice.ok(&["send", "alice", "for alice"]);
    let s2_row = eventually("s2's message", mesh_testkit::WAIT, || {
        let v = s2.json(&["inbox"]);
        (ready_bodies(&v) == ["for s2"]).then(|| v[0].clone())
    });
    eventually("s1's message", mesh_testkit::WAIT, || (ready_bodies(&s1.json(&["inbox"])) == ["for s1"]).then_some(()));
    wait_for_message(&alice, "for alice");

    let s2_id = s2_row["id"].to_string();
    let out = s1.cmd(&["inbox", "delete", &s2_id]).output().expect("run");
    assert_eq!(out.status.code(), Some(1), "deleting another session's row must fail");
    let out = s1.cmd(&["inbox", "ack", &s2_id, "--json"]).output().expect("run");
    assert_eq!(out.status.code(), Some(1), "nor can it be acked");
    let err: serde_json::Value = serde_json::from_slice(&out.stderr).expect("a JSON error");
    assert_eq!(err["error"]["code"], "not_found");
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("the JSON answer");
    assert_eq!((answer["acked"].clone(), answer["not_found"][0].to_string()), (serde_json::json!([]), s2_id.clone()));
    assert_eq!(s1.json(&["inbox", "flush", "--all"])["deleted"], 1);
    assert!(s1.json(&["inbox"]).as_array().expect("array").is_empty());
    assert_eq!(ready_bodies(&s2.json(&["inbox"])), ["for s2"]);
    assert!(s2.json(&["inbox"])[0]["read_at"].is_null());
    assert_eq!(ready_bodies(&alice.json(&["inbox"])), ["for alice"]);

    // The member's flush removes read rows only, and only its own.
    assert_eq!(alice.json(&["inbox", "flush"])["deleted"], 0);
    alice.ok(&["inbox", "ack", "--all"]);
    assert_eq!(alice.json(&["inbox", "flush"])["deleted"], 1);
    assert_eq!(ready_bodies(&s2.json(&["inbox"])), ["for s2"]);
}

#[test]
fn a_flushed_or_deleted_message_leaves_no_body_in_the_event_log_or_the_file() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    let secret = "the launch code is 0451-tangerine";
    alice.ok(&["send", "bob", secret]);
    alice.ok(&["send", "bob", "keep me"]);
    wait_for_message(&bob, secret);
    let keep = wait_for_message(&bob, "keep me");
    let gone = bob.json(&["inbox"]).as_array().expect("array").iter().find(|m| m["body"] == secret).cloned();
    bob.ok(&["inbox", "delete", &gone.expect("row")["id"].to_string()]);
    // Not in the database's files, the write-ahead log included, while the daemon runs (a backup
    // taken now holds no deleted text).
    let files = || {
        let db = bob.paths().daemon_db();
        let mut bytes = std::fs::read(&db).expect("daemon.db");
        bytes.extend(std::fs::read(format!("{}-wal", db.display())).unwrap_or_default());
        bytes
    };
    assert!(!mesh_testkit::contains_bytes(&files(), secret.as_bytes()), "the deleted body is still on disk");
    let replay = bob.ok(&["watch", "--replay", "--no-follow", "--json"]);
    assert!(!replay.contains(secret), "{replay}");
    assert!(replay.contains("\"deleted\":true") && replay.contains("keep me"), "{replay}");
    // Flushing works the same way.
    bob.ok(&["inbox", "flush", "--all"]);
    let replay = bob.ok(&["watch", "--replay", "--no-follow"]);
    assert!(!replay.contains("keep me") && replay.contains(&format!("message #{} from alice", keep["id"])), "{replay}");
    assert!(!mesh_testkit::contains_bytes(&files(), b"keep me"), "the flushed body is still on disk");
    // Nor after the daemon stops.
    bob.ok(&["daemon", "down"]);
    assert!(!mesh_testkit::contains_bytes(&files(), secret.as_bytes()), "the body is still on disk");
}

#[test]
fn inbox_wait_returns_as_soon_as_a_matching_message_arrives() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    // Nothing yet: the listing waits, then answers with the message that arrived meanwhile.
    let waiting = bob
        .cmd(&["inbox", "--unread", "--from", "alice", "--wait", "5m", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("mesh inbox --wait");
    alice.ok(&["send", "bob", "worth the wait"]);
    let out = waiting.wait_with_output().expect("inbox output");
    assert!(out.status.success());
    let got: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(ready_bodies(&got), ["worth the wait"]);
    // With nothing to wait for, it returns an empty listing at the end of the wait.
    bob.ok(&["inbox", "ack", "--all"]);
    let empty = bob.json(&["inbox", "--unread", "--wait", "1s"]);
    assert_eq!(empty.as_array().expect("array").len(), 0);
}
