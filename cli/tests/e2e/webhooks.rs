//! Webhooks end to end: real daemons post to a real receiver that verifies every request with the
//! Python `standardwebhooks` package (`webhook_receiver.py`).

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Read, Write};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use mesh_testkit::{BrokerProcess, WAIT, eventually};
use serde_json::{Value, json};

use super::*;

/// Fast retries, so that failures heal within a test.
const FAST: &str = r#"{"webhooks": {"retry_schedule": ["100ms", "300ms"], "timeout": "30s"}}"#;

/// A running `webhook_receiver.py`; every request it got, as it reported it.
struct Receiver {
    child: Child,
    port: u16,
    seen: Arc<Mutex<Vec<Value>>>,
}

impl Receiver {
    fn start(python: &str) -> Receiver {
        Self::start_on(python, 0)
    }

    fn start_on(python: &str, port: u16) -> Receiver {
        let mut child = Command::new(python)
            .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/webhook_receiver.py"))
            .arg(port.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .spawn()
            .expect("the webhook receiver");
        let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        let ready: Value =
            serde_json::from_str(&lines.next().expect("a ready line").expect("read")).expect("ready is JSON");
        let port = ready["port"].as_u64().expect("port") as u16;
        let seen = Arc::new(Mutex::new(Vec::new()));
        let sink = seen.clone();
        std::thread::spawn(move || {
            for line in lines.map_while(Result::ok) {
                if let Ok(v) = serde_json::from_str::<Value>(&line) {
                    sink.lock().expect("lock").push(v);
                }
            }
        });
        Receiver { child, port, seen }
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}/{path}", self.port)
    }

    /// POSTs JSON to the receiver's control routes.
    fn control(&self, path: &str, body: &Value) -> Value {
        let body = body.to_string();
        let mut s = std::net::TcpStream::connect(("127.0.0.1", self.port)).expect("connect to the receiver");
        write!(
            s,
            "POST /{path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .expect("write");
        let mut answer = String::new();
        s.read_to_string(&mut answer).expect("read");
        let json = answer.split("\r\n\r\n").nth(1).unwrap_or_default();
        serde_json::from_str(json).unwrap_or(Value::Null)
    }

    fn set_secrets(&self, endpoint: &str, secrets: &[&str]) {
        self.control("control", &json!({ "endpoint": endpoint, "secrets": secrets }));
    }

    fn requests(&self, endpoint: &str) -> Vec<Value> {
        self.seen.lock().expect("lock").iter().filter(|r| r["endpoint"] == endpoint).cloned().collect()
    }

    /// The requests to `endpoint` once `done` accepts them.
    fn wait(&self, endpoint: &str, what: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        eventually(&format!("{endpoint}: {what}"), WAIT, || {
            let r = self.requests(endpoint);
            done(&r).then_some(r)
        })
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        self.kill();
    }
}

fn payload(r: &Value) -> Value {
    serde_json::from_str(r["body"].as_str().expect("body")).expect("the body is JSON")
}

/// Message bodies in these requests (of `message` payloads).
fn bodies(requests: &[Value]) -> BTreeSet<String> {
    requests
        .iter()
        .map(payload)
        .filter(|p| p["type"] == "message")
        .filter_map(|p| p["data"]["body"].as_str().map(str::to_owned))
        .collect()
}

fn python() -> Option<String> {
    super::python_with("standardwebhooks", "standardwebhooks")
}

/// Two members on one broker, their daemons started with `config` as `config/daemon.json`.
fn team_with(broker: &BrokerProcess, config: &str) -> (TestHome, TestHome) {
    let (alice, bob) = (TestHome::new(MESH), TestHome::new(MESH));
    for (home, name) in [(&alice, "alice"), (&bob, "bob")] {
        home.ok(&["init", "--name", name]);
        std::fs::write(home.paths().config_dir.join("daemon.json"), config).expect("config");
        home.ok(&["daemon", "up", "--no-embedded"]);
    }
    alice.ok(&["create", "team", "--broker", &broker.url]);
    let token = alice.ok(&["invite", "--mesh", "team", "--uses", "0"]).trim().to_owned();
    bob.ok(&["join", &token]);
    wait_for_peer(&alice, "bob");
    wait_for_peer(&bob, "alice");
    (alice, bob)
}

/// `mesh webhook add …` in `home` (or a session's command), returning (id, secret).
fn add(cmd: Command) -> (i64, String) {
    let mut cmd = cmd;
    let out = cmd.arg("--json").output().expect("mesh webhook add");
    assert!(out.status.success(), "webhook add failed: {}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).expect("json");
    (v["webhook"]["id"].as_i64().expect("id"), v["secret"].as_str().expect("secret").to_owned())
}

fn key_of(home: &TestHome) -> String {
    home.json(&["daemon", "status"])["member"]["key"].as_str().expect("key").to_owned()
}

#[test]
fn each_endpoint_gets_exactly_its_owners_messages_signed() {
    let Some(py) = python() else { return };
    let rx = Receiver::start(&py);
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team_with(&broker, FAST);
    let w1 = alice.launch("w1", None);
    let w2 = alice.launch("w2", None);
    w1.ok(&["group", "join", "ops"]);
    wait_for_peer(&bob, "w1");
    wait_for_peer(&bob, "w2");
    bob.eventually_json("w1 in @ops", &["peers"], |v| {
        v.as_array().expect("peers").iter().any(|p| p["name"] == "w1" && p["groups"].to_string().contains("ops"))
    });

    let (_, member_secret) = add(alice.cmd(&["webhook", "add", &rx.url("ok/member")]));
    let (_, w1_secret) = add(w1.cmd(&["webhook", "add", &rx.url("ok/w1")]));
    let (_, w2_secret) = add(w2.cmd(&["webhook", "add", &rx.url("ok/w2")]));
    rx.set_secrets("member", &[&member_secret]);
    rx.set_secrets("w1", &[&w1_secret]);
    rx.set_secrets("w2", &[&w2_secret]);

    bob.ok(&["send", "alice", "to alice"]);
    bob.ok(&["send", "w1", "to w1"]);
    bob.ok(&["send", "w2", "to w2"]);
    bob.ok(&["send", "*", "to everyone"]);
    bob.ok(&["send", "@ops", "to ops"]);
    alice.ok(&["send", "bob", "from alice"]);

    let expected: BTreeMap<&str, Vec<&str>> = BTreeMap::from([
        ("member", vec!["to alice", "to everyone"]),
        ("w1", vec!["to everyone", "to ops", "to w1"]),
        ("w2", vec!["to everyone", "to w2"]),
    ]);
    for (endpoint, want) in &expected {
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        rx.wait(endpoint, "its messages", |r| bodies(r) == want);
    }
    // Alice's endpoint also hears that bob's daemon got her message.
    let receipts = rx.wait("member", "a delivered receipt", |r| {
        r.iter().map(payload).any(|p| p["type"] == "receipt" && p["data"]["kind"] == "delivered")
    });
    // Every delivery made is delivered: nothing more is on its way, so these sets are exact.
    alice.eventually_json("no webhook delivery pending", &["daemon", "status"], |v| {
        v["webhooks"]["deliveries"]["pending"] == 0
    });
    for (endpoint, want) in &expected {
        let got = rx.requests(endpoint);
        let want: BTreeSet<String> = want.iter().map(|s| s.to_string()).collect();
        assert_eq!(bodies(&got), want, "{endpoint} got exactly its own messages");
        let messages = got.iter().filter(|r| payload(r)["type"] == "message").count();
        assert_eq!(messages, want.len(), "{endpoint}: each once");
        for r in &got {
            assert_eq!(r["verified"], json!([true]), "{endpoint}: signed with its own secret: {r}");
            assert!(r["headers"]["webhook-id"].as_str().is_some_and(|id| id.starts_with("msg_")));
            assert_eq!(r["headers"]["content-type"], "application/json");
        }
    }
    let bob_key = key_of(&bob);
    let to_alice = rx.requests("member").into_iter().map(|r| payload(&r)).find(|p| p["data"]["body"] == "to alice");
    let to_alice = to_alice.expect("the DM");
    assert_eq!(to_alice["data"]["from"], bob_key);
    assert_eq!(to_alice["data"]["from_name"], "bob");
    assert_eq!(to_alice["data"]["mesh"], "team");
    assert_eq!(to_alice["data"]["audience"], key_of(&alice));
    assert!(to_alice["timestamp"].as_str().is_some_and(|t| t.ends_with('Z')));

    // A forged body, or the same request re-timestamped, fails verification on that receiver.
    let r = receipts.iter().find(|r| payload(r)["type"] == "receipt").expect("the receipt");
    let verify = |body: &str, headers: &Value| {
        rx.control("verify", &json!({"endpoint": "member", "body": body, "headers": headers}))["verified"].clone()
    };
    let body = r["body"].as_str().expect("body");
    assert_eq!(verify(body, &r["headers"]), json!([true]), "the request as sent verifies");
    assert_eq!(verify(&body.replace("delivered", "read"), &r["headers"]), json!([false]));
    let mut later = r["headers"].clone();
    let ts: u64 = later["webhook-timestamp"].as_str().expect("ts").parse().expect("seconds");
    later["webhook-timestamp"] = json!((ts + 1).to_string());
    assert_eq!(verify(body, &later), json!([false]), "a new timestamp needs a new signature");

    // Scoping: a session lists and manages only its own endpoints; the secret is never listed.
    let listed = w1.json(&["webhook", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed}");
    assert_eq!(alice.json(&["webhook", "list"]).as_array().map(Vec::len), Some(3));
    let member_id = alice.json(&["webhook", "list"])[0]["id"].as_i64().expect("id").to_string();
    let out = w1.cmd(&["webhook", "remove", &member_id]).output().expect("run");
    assert_eq!(out.status.code(), Some(1), "not the session's to remove");
    assert!(String::from_utf8_lossy(&out.stderr).contains("no webhook"), "{}", String::from_utf8_lossy(&out.stderr));
    let all = alice.ok(&["webhook", "list", "--json"]) + &alice.ok(&["webhook", "show", &member_id, "--json"]);
    for secret in [&member_secret, &w1_secret, &w2_secret] {
        assert!(!all.contains(secret.as_str()), "a secret is shown only when made");
    }
}

#[test]
fn a_rotation_signs_with_both_secrets_during_the_overlap_then_only_the_new_one() {
    let Some(py) = python() else { return };
    let rx = Receiver::start(&py);
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "solo"]);
    std::fs::write(home.paths().config_dir.join("daemon.json"), r#"{"webhooks": {"rotation_overlap": "3s"}}"#)
        .expect("config");
    home.ok(&["daemon", "up"]);
    let (id, old) = add(home.cmd(&["webhook", "add", &rx.url("ok/rot")]));
    let id = id.to_string();
    let rotated = home.json(&["webhook", "rotate", &id]);
    let new = rotated["secret"].as_str().expect("secret").to_owned();
    assert_ne!(new, old);
    // Verified separately with each secret: a receiver holding only one of them accepts it.
    rx.set_secrets("rot", &[&old, &new]);
    home.ok(&["webhook", "test", &id]);
    let first = rx.wait("rot", "the test", |r| !r.is_empty());
    assert_eq!(first[0]["verified"], json!([true, true]), "{}", first[0]);
    assert_eq!(first[0]["headers"]["webhook-signature"].as_str().map(|s| s.split(' ').count()), Some(2));
    // After the overlap only the new secret signs.
    eventually("a request signed by the new secret only", WAIT, || {
        home.ok(&["webhook", "test", &id]);
        let last = rx.requests("rot").last().cloned()?;
        (last["verified"] == json!([false, true])).then_some(())
    });
}

#[test]
fn failures_are_retried_until_delivered_and_410_disables() {
    let Some(py) = python() else { return };
    let mut rx = Receiver::start(&py);
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "solo"]);
    std::fs::write(home.paths().config_dir.join("daemon.json"), FAST).expect("config");
    home.ok(&["daemon", "up"]);
    let session = home.launch("s", None);

    // 500, 500, then 204: one delivery, three attempts, one webhook-id.
    let (flaky, _) = add(session.cmd(&["webhook", "add", &rx.url("fail/2/flaky")]));
    home.ok(&["send", "s", "flaky one"]);
    let got = rx.wait("flaky", "three attempts", |r| r.len() >= 3);
    let ids: BTreeSet<&str> = got.iter().filter_map(|r| r["headers"]["webhook-id"].as_str()).collect();
    assert_eq!(ids.len(), 1, "retries keep the webhook-id");
    assert_eq!(got.iter().map(|r| r["answered"].as_u64()).collect::<Vec<_>>(), [Some(500), Some(500), Some(204)]);
    let d = session.json(&["webhook", "deliveries", &flaky.to_string()]);
    assert_eq!((d[0]["status"].as_str(), d[0]["attempts"].as_u64()), (Some("delivered"), Some(3)), "{d}");

    // A 404 is retried once, then dead; redelivered on request.
    let (refused, _) = add(session.cmd(&["webhook", "add", &rx.url("status/404/refused")]));
    home.ok(&["send", "s", "refused one"]);
    rx.wait("refused", "two attempts", |r| r.len() >= 2);
    let dead = home.eventually_json(
        "a dead delivery",
        &["webhook", "deliveries", &refused.to_string(), "--status", "dead"],
        |v| v.as_array().is_some_and(|a| a.len() == 1),
    );
    assert!(dead[0]["last_error"].as_str().is_some_and(|e| e.starts_with("404")), "{dead}");
    let again = session.json(&["webhook", "redeliver", "--all-dead", &refused.to_string()]);
    assert_eq!(again["redelivered"], 1);
    rx.wait("refused", "a third attempt after redeliver", |r| r.len() >= 3);

    // The receiver down for a while, then back on the same port: every delivery arrives.
    let port = rx.port;
    let (down, _) = add(session.cmd(&["webhook", "add", &rx.url("ok/down")]));
    rx.kill();
    for i in 0..5 {
        home.ok(&["send", "s", &format!("while down {i}")]);
    }
    home.eventually_json("failed attempts", &["webhook", "deliveries", &down.to_string(), "--status", "failed"], |v| {
        v.as_array().is_some_and(|a| !a.is_empty())
    });
    rx = Receiver::start_on(&py, port);
    let want: BTreeSet<String> = (0..5).map(|i| format!("while down {i}")).collect();
    rx.wait("down", "all five", |r| bodies(r) == want);

    // 410 Gone disables the endpoint; status says so, and an event tells its owner.
    let (gone, _) = add(session.cmd(&["webhook", "add", &rx.url("status/410/gone")]));
    home.ok(&["send", "s", "to a gone endpoint"]);
    let status = home.eventually_json("the endpoint disabled", &["daemon", "status"], |v| {
        v["webhooks"]["disabled"].as_array().is_some_and(|d| d.iter().any(|x| x["id"] == gone))
    });
    let reason = status["webhooks"]["disabled"][0]["reason"].as_str().unwrap_or_default().to_owned();
    assert!(reason.contains("410"), "{status}");
    assert!(home.ok(&["daemon", "status"]).contains("DISABLED"), "the human status shows it");
    let events = session.ok(&["watch", "--since", "0", "--no-follow", "--json"]);
    assert!(events.contains(r#""kind":"webhook""#) || events.contains(r#""kind": "webhook""#), "{events}");
    let info = session.json(&["webhook", "show", &gone.to_string()]);
    assert_eq!((info["enabled"].as_bool(), info["deliveries"]["pending"].as_u64()), (Some(false), Some(1)), "{info}");
}

#[test]
fn deliveries_in_flight_when_the_daemon_is_killed_arrive_after_its_restart() {
    let Some(py) = python() else { return };
    let rx = Receiver::start(&py);
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team_with(&broker, FAST);
    // The first two requests are answered after 2 s, so the kill lands while one is in flight.
    let (_, secret) = add(alice.cmd(&["webhook", "add", &rx.url("slow/2000/2/k9")]));
    rx.set_secrets("k9", &[&secret]);
    for i in 0..20 {
        bob.ok(&["send", "alice", &format!("m{i}")]);
    }
    rx.wait("k9", "a second request in flight", |r| r.iter().filter(|x| x["answered"].is_null()).count() >= 2);
    alice.kill9_daemon();
    alice.ok(&["daemon", "up", "--no-embedded"]);
    let want: BTreeSet<String> = (0..20).map(|i| format!("m{i}")).collect();
    let got = rx.wait("k9", "all twenty, after the restart", |r| {
        bodies(&r.iter().filter(|x| x["answered"] == 204).cloned().collect::<Vec<_>>()) == want
    });
    // Duplicates only ever carry the same webhook-id.
    let mut ids: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for r in &got {
        if let Some(b) = payload(r)["data"]["body"].as_str() {
            ids.entry(b.to_owned()).or_default().insert(r["headers"]["webhook-id"].as_str().unwrap_or("").to_owned());
        }
    }
    assert!(ids.values().all(|s| s.len() == 1), "one webhook-id per message: {ids:?}");
    assert!(got.iter().all(|r| r["verified"] == json!([true])));
}

#[test]
fn an_endpoint_that_never_answers_delays_neither_the_inbox_nor_other_endpoints() {
    let Some(py) = python() else { return };
    let rx = Receiver::start(&py);
    let broker = BrokerProcess::start(MESH);
    // The hanging request is cut after 30 s; everything below must happen while it still hangs.
    let (alice, bob) = team_with(&broker, FAST);
    add(alice.cmd(&["webhook", "add", &rx.url("hang/stuck")]));
    add(alice.cmd(&["webhook", "add", &rx.url("ok/fast")]));
    for i in 0..20 {
        bob.ok(&["send", "alice", &format!("n{i}")]);
    }
    let want: BTreeSet<String> = (0..20).map(|i| format!("n{i}")).collect();
    rx.wait("fast", "all twenty on the healthy endpoint", |r| bodies(r) == want);
    let inbox = alice.json(&["inbox", "--limit", "100"]);
    assert_eq!(ready_bodies(&inbox).len(), 20, "the inbox took every message");
    let stuck = rx.requests("stuck");
    assert_eq!(stuck.len(), 1, "one request in flight to the hanging endpoint, still unanswered: {stuck:?}");
    assert_eq!(stuck[0]["answered"], Value::Null);
}

#[test]
fn bad_endpoints_are_refused_with_a_reason() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "solo"]);
    home.ok(&["daemon", "up"]);
    let refused = |args: &[&str], needle: &str| {
        let mut all = vec!["webhook", "add"];
        all.extend_from_slice(args);
        let err = home.fails(&all, 1);
        assert!(err.contains(needle), "{args:?}: {err}");
    };
    refused(&["http://example.com/hook"], "plain http:// is only for this machine");
    refused(&["ftp://127.0.0.1/x"], "http:// or https://");
    refused(&["https://user:pw@example.com/x"], "user name or password");
    refused(&["not a url"], "not a URL");
    refused(&["https://example.com/x", "--events", "message,gossip"], "gossip");
    refused(&["https://example.com/x", "--from", "nobody-here"], "nobody-here");
    refused(&["https://example.com/x", "--from", "*"], "one peer");
    refused(&["https://example.com/x", "--events", ""], "names no kind");
    let broker = home.json(&["daemon", "status"])["embedded_broker"].as_str().expect("embedded").to_owned();
    let port = broker.rsplit(':').next().expect("port");
    refused(&[&format!("http://localhost:{port}/x")], "broker this daemon uses");
    let mapped = format!("http://[::ffff:127.0.0.1]:{port}/x");
    refused(&[&mapped, "--allow-insecure-http"], "broker this daemon uses");
    // Allowed on request, and https anywhere.
    home.ok(&["webhook", "add", "http://example.com/hook", "--allow-insecure-http"]);
    home.ok(&["webhook", "add", "https://example.com/hook", "--events", "presence"]);
    assert_eq!(home.json(&["webhook", "list"]).as_array().map(Vec::len), Some(2));
    assert!(home.fails(&["webhook", "show", "999"], 1).contains("no webhook #999"));
}

#[test]
fn endpoints_that_hang_cannot_hold_every_slot() {
    let Some(py) = python() else { return };
    let rx = Receiver::start(&py);
    let broker = BrokerProcess::start(MESH);
    // Nine endpoints that never answer (more than the 8 slots), cut after 1 s and retried at once.
    let (alice, bob) = team_with(&broker, r#"{"webhooks": {"retry_schedule": ["100ms"], "timeout": "1s"}}"#);
    for i in 0..9 {
        add(alice.cmd(&["webhook", "add", &rx.url(&format!("hang/h{i}"))]));
    }
    add(alice.cmd(&["webhook", "add", &rx.url("ok/healthy")]));
    for i in 0..40 {
        bob.ok(&["send", "alice", &format!("h{i}")]);
    }
    // One at a time, a slot per hanging timeout would take 40 s; the answering endpoint keeps slots.
    let want: BTreeSet<String> = (0..40).map(|i| format!("h{i}")).collect();
    rx.wait("healthy", "all forty while nine endpoints hang", |r| bodies(r) == want);
}

#[test]
fn an_endpoint_whose_port_becomes_a_broker_of_this_daemon_is_disabled_not_posted_to() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "solo"]);
    home.ok(&["daemon", "up", "--no-embedded"]);
    // Added while nothing listens on its port; then a broker starts there and this daemon uses it.
    let dir = tempfile::tempdir().expect("tempdir");
    let (id, broker) = loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port();
        let id = home.json(&["webhook", "add", &format!("http://127.0.0.1:{port}/hook")])["webhook"]["id"].clone();
        let broker = BrokerProcess::spawn(MESH, &dir.path().join("b.db"), port, &[]);
        if broker.port == port {
            break (id, broker);
        }
        home.ok(&["webhook", "remove", &id.to_string()]);
    };
    home.ok(&["create", "team", "--broker", &broker.url]);
    let id = id.to_string();
    let out = home.run(&["webhook", "test", &id]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let info = home.json(&["webhook", "show", &id]);
    assert_eq!(info["enabled"], false, "{info}");
    assert!(info["disabled_reason"].as_str().is_some_and(|r| r.contains("broker this daemon uses")), "{info}");
}

#[test]
fn endpoints_that_answered_at_once_and_then_hang_cannot_hold_every_slot() {
    let Some(py) = python() else { return };
    let rx = Receiver::start(&py);
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team_with(&broker, r#"{"webhooks": {"timeout": "60s"}}"#);
    // Ten endpoints that answer their first request at once (so they count as prompt), then hang.
    for i in 0..10 {
        let (id, _) = add(alice.cmd(&["webhook", "add", &rx.url(&format!("after/1/t{i}"))]));
        alice.ok(&["webhook", "test", &id.to_string()]);
    }
    let (healthy, _) = add(alice.cmd(&["webhook", "add", &rx.url("ok/steady")]));
    alice.ok(&["webhook", "test", &healthy.to_string()]);
    for i in 0..20 {
        bob.ok(&["send", "alice", &format!("s{i}")]);
    }
    // Their hanging requests (cut only after 60 s) leave the answering endpoint slots.
    let want: BTreeSet<String> = (0..20).map(|i| format!("s{i}")).collect();
    rx.wait("steady", "all twenty while ten endpoints hang", |r| bodies(r) == want);
}
