//! Agent sessions: own keys, own connection, own inbox; offline delivery; names; restarts.

use mesh_testkit::{BrokerProcess, TestHome};
use serde_json::Value;

use super::*;
use serde_json::json;

/// A broker with alice (owner of "team") and bob (member), both daemons up and in each other's roster.
pub fn team(broker: &BrokerProcess) -> (TestHome, TestHome) {
    let (alice, bob) = (TestHome::new(MESH), TestHome::new(MESH));
    alice.ok(&["init", "--name", "alice"]);
    bob.ok(&["init", "--name", "bob"]);
    alice.ok(&["daemon", "up", "--no-embedded"]);
    bob.ok(&["daemon", "up", "--no-embedded"]);
    match &broker.tls_pin {
        Some(pin) => alice.ok(&["create", "team", "--broker", &broker.url, "--pin", pin]),
        None => alice.ok(&["create", "team", "--broker", &broker.url]),
    };
    let token = alice.ok(&["invite", "--mesh", "team", "--uses", "0"]).trim().to_owned();
    bob.ok(&["join", &token]);
    wait_for_peer(&alice, "bob");
    (alice, bob)
}

fn session_key(home: &TestHome, name: &str) -> String {
    let list = home.json(&["session", "list"]);
    list.as_array().expect("array").iter().find(|s| s["name"] == name).expect("session listed")["key"]
        .as_str()
        .expect("key")
        .to_owned()
}

fn inbox_of(v: &Value) -> Vec<(String, String)> {
    v.as_array()
        .expect("array")
        .iter()
        .filter_map(|m| Some((m["body"].as_str()?.to_owned(), m["from"].as_str()?.to_owned())))
        .collect()
}

#[test]
fn a_session_sends_with_its_own_key_and_reads_only_its_own_messages() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    let member_key = alice.json(&["daemon", "status"])["member"]["key"].as_str().expect("key").to_owned();
    let worker = alice.launch("worker", None);
    let worker_key = session_key(&alice, "worker");
    assert_ne!(worker_key, member_key);
    let me = worker.json(&["session", "whoami"]);
    assert_eq!((me["name"].as_str(), me["live"].as_bool()), (Some("worker"), Some(true)));

    worker.ok(&["send", "bob", "from the worker session"]);
    alice.ok(&["send", "bob", "from alice herself"]);
    let from_worker = wait_for_message(&bob, "from the worker session");
    assert_eq!(from_worker["from"], worker_key.as_str(), "the broker attributed it to the session's own connection");
    assert_eq!(from_worker["from_name"], "worker");
    assert_eq!(wait_for_message(&bob, "from alice herself")["from"], member_key.as_str());

    // Bob answers the session by name; only the session sees it.
    wait_for_peer(&bob, "worker");
    bob.ok(&["send", "worker", "reply to the worker"]);
    bob.ok(&["send", "alice", "reply to alice"]);
    let worker_inbox = worker_eventually(&worker, "reply to the worker");
    assert!(!inbox_of(&worker_inbox).iter().any(|(b, _)| b == "reply to alice"), "a session saw the member's message");
    wait_for_message(&alice, "reply to alice");
    assert!(
        !ready_bodies(&alice.json(&["inbox"])).iter().any(|b| b == "reply to the worker"),
        "the member saw a session's message"
    );

    // Each sees only its own outbox.
    let worker_outbox = worker.json(&["outbox"]);
    assert_eq!(worker_outbox.as_array().expect("array").len(), 1);
    assert_eq!(worker_outbox[0]["session"], "worker");
}

fn worker_eventually(session: &mesh_testkit::SessionProcess, body: &str) -> Value {
    mesh_testkit::eventually(&format!("{body:?} in the session's inbox"), mesh_testkit::WAIT, || {
        let v = session.json(&["inbox"]);
        ready_bodies(&v).iter().any(|b| b == body).then_some(v)
    })
}

#[test]
fn a_session_row_waits_for_the_session_s_own_socket_and_never_falls_back_to_the_member_s() {
    let mut broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    let mut worker = alice.launch("worker", Some("team"));
    let worker_key = session_key(&alice, "worker");
    wait_for_peer(&bob, "worker");

    broker.kill9();
    worker.ok(&["send", "bob", "written while the broker was down"]);
    // A pending row says what it waits for: its connection's state and since when (its next attempt
    // is in the JSON; in words, it is sent once the connection is back).
    let waiting = worker.json(&["outbox"])[0].clone();
    assert_eq!(waiting["status"], "pending", "{waiting}");
    assert!(waiting["link"]["state"].is_string() && waiting["next_attempt_at"].is_u64(), "{waiting}");
    alice.eventually_json("the worker's link down", &["outbox"], |v| {
        v.as_array().expect("array").iter().any(|r| r["session"] == "worker" && r["link"]["state"] == "offline")
    });
    let text = alice.ok(&["outbox"]);
    assert!(text.contains("broker connection offline since") && text.contains("sent once it is online"), "{text}");
    worker.kill();
    alice.eventually_json("the worker session to end", &["session", "list"], |v| v[0]["live"] == false);

    broker.start_again(MESH);
    alice.eventually_json("alice's own link back online", &["daemon", "status"], |v| {
        v["meshes"][0]["connection"]["state"] == "online"
    });
    alice.ok(&["send", "bob", "the member's link works"]);
    wait_for_message(&bob, "the member's link works");
    // The member's connection drained its own row and left the session's alone.
    assert!(!ready_bodies(&bob.json(&["inbox"])).iter().any(|b| b == "written while the broker was down"));
    let row = alice
        .json(&["outbox"])
        .as_array()
        .expect("array")
        .iter()
        .find(|r| r["session"] == "worker")
        .cloned()
        .expect("row");
    assert_eq!(row["status"], "pending", "{row}");

    let _worker = alice.launch("worker", Some("team"));
    let arrived = wait_for_message(&bob, "written while the broker was down");
    assert_eq!(arrived["from"], worker_key.as_str(), "sent on the session's own connection");
}

#[test]
fn a_message_to_an_offline_session_is_delivered_when_it_next_runs_and_the_sender_learns_it() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    let mut helper = bob.launch("helper", None);
    wait_for_peer(&alice, "helper");
    helper.kill();
    alice.eventually_json("helper offline in alice's roster", &["peers"], |v| {
        v.as_array().expect("array").iter().any(|p| p["name"] == "helper" && p["online"] == false)
    });

    // Accepted by the broker for the offline session, but not delivered.
    let sent = alice.json(&["send", "helper", "for when you are back", "--wait", "accepted"]);
    assert_eq!((sent["wait"]["reached"].clone(), sent["wait"]["delivered_count"].clone()), (json!(true), json!(0)));
    assert_eq!(sent["status"], "done");
    let err = alice.fails(&["send", "helper", "are you there?", "--wait", "delivered", "--timeout", "1s"], 1);
    assert!(err.contains("was delivered by 0 of 1 recipient(s) within 1s"), "{err}");
    assert!(err.contains("stays queued at the broker"), "{err}");

    let helper = bob.launch("helper", None);
    worker_eventually(&helper, "for when you are back");
    worker_eventually(&helper, "are you there?");
    alice.eventually_json("delivered receipts for both", &["outbox"], |v| {
        v.as_array().expect("array").iter().all(|r| r["delivered_at"].is_u64())
    });
    let waited = alice.json(&["send", "helper", "now it is live", "--wait", "delivered"]);
    assert_eq!(waited["wait"]["reached"], true);
    assert_eq!(waited["wait"]["delivered_count"], 1);
}

#[test]
fn a_live_name_is_unique_and_the_registry_survives_a_daemon_restart() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "alice"]);
    home.ok(&["daemon", "up"]);
    let worker = home.launch("worker", None);
    let key = session_key(&home, "worker");
    let err = home.fails(&["launch", "--name", "worker", "--", "true"], 1);
    assert!(err.contains("already running"), "{err}");

    home.ok(&["daemon", "down"]);
    home.ok(&["daemon", "up"]);
    let list = home.json(&["session", "list"]);
    assert_eq!(list[0]["live"], true, "the session's process still runs: {list}");
    assert_eq!(list[0]["key"], key.as_str(), "same keys after a restart");
    worker.ok(&["send", "alice", "still here after the restart"]);
    wait_for_message(&home, "still here after the restart");

    // No answer ever carries a token or a secret key.
    let token = std::fs::read_to_string(&worker.token_file).expect("token");
    let identity = std::fs::read_to_string(home.paths().identity_path()).expect("identity");
    let seed: Value = serde_json::from_str(&identity).expect("json");
    for args in [&["session", "list", "--json"][..], &["daemon", "status", "--json"], &["peers", "--json"]] {
        let out = home.ok(args);
        assert!(!out.contains(token.trim()), "{args:?} leaked a session token");
        assert!(!out.contains(seed["sign_seed"].as_str().expect("seed")), "{args:?} leaked a key");
    }
}

#[test]
fn a_stale_session_file_is_refused_not_downgraded_to_the_member() {
    let home = TestHome::new(MESH);
    home.ok(&["daemon", "up"]);
    let mut worker = home.launch("worker", None);
    let file = worker.token_file.clone();
    worker.kill();
    home.eventually_json("the session to end", &["session", "list"], |v| v[0]["live"] == false);
    assert!(!file.exists(), "the token file is removed when the session ends");
    let out = worker.cmd(&["inbox"]).output().expect("run");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("MESH_SESSION_FILE"));
}
