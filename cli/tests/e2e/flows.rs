//! The first encrypted messages end to end: a standalone broker, and the embedded one.

use mesh_testkit::{BrokerProcess, TestHome, contains_bytes};

use super::*;

fn identity_seed(home: &TestHome) -> Vec<u8> {
    use base64::Engine;
    let text = std::fs::read_to_string(home.paths().identity_path()).expect("identity file");
    let v: serde_json::Value = serde_json::from_str(&text).expect("identity JSON");
    base64::engine::general_purpose::STANDARD.decode(v["sign_seed"].as_str().expect("seed")).expect("base64")
}

#[test]
fn two_daemons_over_a_broker_exchange_direct_and_broadcast_messages_even_across_a_restart() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = (TestHome::new(MESH), TestHome::new(MESH));
    alice.ok(&["init", "--name", "alice"]);
    bob.ok(&["init", "--name", "bob"]);
    alice.ok(&["daemon", "up", "--no-embedded"]);
    bob.ok(&["daemon", "up", "--no-embedded"]);

    alice.ok(&["create", "team", "--broker", &broker.url]);
    let token = alice.ok(&["invite", "--mesh", "team"]).trim().to_owned();
    assert!(token.starts_with("mesh-invite-v1."), "{token}");
    let joined = bob.json(&["join", &token]);
    assert_eq!(joined["name"], "team");
    assert_eq!(joined["role"], "member");
    wait_for_peer(&alice, "bob");

    let sent = alice.json(&["send", "bob", "dm: hello bob"]);
    assert_eq!(sent["target"]["kind"], "direct");
    assert_eq!(sent["status"], "pending");
    alice.ok(&["send", "*", "broadcast: hello everyone"]);
    bob.ok(&["send", "alice", "dm: hello alice"]);

    let dm = wait_for_message(&bob, "dm: hello bob");
    assert_eq!((dm["kind"].as_str(), dm["from_name"].as_str()), (Some("direct"), Some("alice")));
    assert!(dm["read_at"].is_null(), "listing must not mark read");
    let broadcast = wait_for_message(&bob, "broadcast: hello everyone");
    assert_eq!(broadcast["kind"], "broadcast");
    wait_for_message(&alice, "dm: hello alice");
    // Nobody receives their own broadcast.
    assert!(!super::ready_bodies(&alice.json(&["inbox"])).iter().any(|b| b.starts_with("broadcast")));

    // The sender sees the delivered receipt on its outbox row.
    alice.eventually_json("a delivered receipt for the DM", &["outbox"], |v| {
        v.as_array().expect("array").iter().any(|r| r["body"] == "dm: hello bob" && r["delivered_at"].is_u64())
    });

    // Recipient offline: the broker queues, the restarted daemon receives.
    bob.ok(&["daemon", "down"]);
    alice.ok(&["send", "bob", "while you were away"]);
    alice.eventually_json("the broker to accept the message for offline bob", &["outbox"], |v| {
        v.as_array().expect("array").iter().any(|r| r["body"] == "while you were away" && r["status"] == "done")
    });
    bob.ok(&["daemon", "up", "--no-embedded"]);
    wait_for_message(&bob, "while you were away");

    // Each message exactly once.
    let bodies = super::ready_bodies(&bob.json(&["inbox", "--limit", "1000"]));
    for b in ["dm: hello bob", "broadcast: hello everyone", "while you were away"] {
        assert_eq!(bodies.iter().filter(|x| *x == b).count(), 1, "{b:?} in {bodies:?}");
    }

    // The broker stored ciphertext only: no plaintext, no private key.
    let stored = broker.stored_bytes();
    assert!(!stored.is_empty());
    for plain in ["dm: hello bob", "broadcast: hello everyone", "dm: hello alice", "while you were away"] {
        assert!(!contains_bytes(&stored, plain.as_bytes()), "broker database contains {plain:?}");
    }
    for home in [&alice, &bob] {
        assert!(!contains_bytes(&stored, &identity_seed(home)), "broker database contains a private key");
    }
}

#[test]
fn a_fresh_home_gets_a_local_mesh_on_an_embedded_broker_that_others_can_join() {
    let (alice, bob) = (TestHome::new(MESH), TestHome::new(MESH));
    alice.ok(&["init", "--name", "alice"]);
    alice.ok(&["daemon", "up"]);
    let status = alice.json(&["daemon", "status"]);
    assert!(status["embedded_broker"].as_str().is_some_and(|u| u.starts_with("ws://127.0.0.1:")), "{status}");
    assert_eq!(status["meshes"][0]["name"], "alice-local");
    alice.eventually_json("the local mesh online", &["daemon", "status"], |s| {
        s["meshes"][0]["connection"]["state"] == "online"
    });

    let token = alice.ok(&["invite"]).trim().to_owned();
    bob.ok(&["init", "--name", "bob"]);
    bob.ok(&["daemon", "up"]);
    bob.ok(&["join", &token]);
    let meshes = bob.json(&["meshes"]);
    assert_eq!(meshes.as_array().expect("array").len(), 2, "bob's own local mesh and alice's: {meshes}");
    wait_for_peer(&alice, "bob");

    alice.ok(&["send", "bob", "dm over the embedded broker"]);
    alice.ok(&["send", "*", "broadcast over the embedded broker"]);
    wait_for_message(&bob, "dm over the embedded broker");
    wait_for_message(&bob, "broadcast over the embedded broker");
    bob.ok(&["send", "alice", "reply from bob"]);
    wait_for_message(&alice, "reply from bob");

    // Bob is in two meshes: "everyone" is ambiguous without --mesh, and never guessed.
    let err = bob.fails(&["send", "*", "which mesh?"], 1);
    assert!(err.contains("--mesh"), "{err}");

    bob.ok(&["daemon", "down"]);
    alice.ok(&["send", "bob", "queued in the embedded broker"]);
    bob.ok(&["daemon", "up"]);
    wait_for_message(&bob, "queued in the embedded broker");

    let db = alice.paths().embedded_broker_db();
    let mut stored = std::fs::read(&db).expect("embedded broker database");
    stored.extend(std::fs::read(db.with_extension("db-wal")).unwrap_or_default());
    for plain in [
        "dm over the embedded broker",
        "broadcast over the embedded broker",
        "reply from bob",
        "queued in the embedded broker",
    ] {
        assert!(!contains_bytes(&stored, plain.as_bytes()), "embedded broker database contains {plain:?}");
    }
}

#[test]
fn targets_resolve_by_name_key_or_unique_prefix_and_offer_what_was_meant() {
    let alice = TestHome::new(MESH);
    alice.ok(&["init", "--name", "alice"]);
    alice.ok(&["daemon", "up"]);
    let key = alice.json(&["daemon", "status"])["member"]["key"].as_str().expect("key").to_owned();

    // A near miss is refused, with the candidate offered (text and JSON); never oneself.
    let _reviewer = alice.launch("reviewer", None);
    let reviewer = alice.json(&["session", "list"])[0]["key"].as_str().expect("key").to_owned();
    let err = alice.fails(&["send", "reviewr", "typo?"], 1);
    assert!(err.contains("no peer \"reviewr\"") && err.contains("did you mean reviewer"), "{err}");
    let out = alice.cmd(&["send", "reviewr", "typo?", "--json"]).output().expect("run");
    let err: Value = serde_json::from_slice(&out.stderr).expect("JSON error");
    assert_eq!(err["error"]["code"], "unknown_target");
    assert_eq!(err["error"]["candidates"].as_array().expect("candidates").len(), 1);
    assert_eq!(err["error"]["candidates"][0]["key"], reviewer.as_str());
    let err = alice.fails(&["send", "alic", "myself?"], 1);
    assert!(!err.contains("did you mean alice"), "oneself is not offered: {err}");
    // Too short to be a key prefix.
    alice.fails(&["send", &key[..3], "three digits?"], 1);

    // The short key shown everywhere, any unique prefix of 4+ digits, and the full key all work.
    for (target, body) in [(&key[..8], "by short key"), (&key[..5], "by prefix"), (key.as_str(), "note to self")] {
        let sent = alice.json(&["send", target, body]);
        assert_eq!(sent["target"]["address"], key.as_str(), "{target}");
        let row = wait_for_message(&alice, body);
        assert_eq!(row["kind"], "direct");
    }
}
