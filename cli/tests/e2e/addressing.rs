//! Addressing when names collide: names unique per mesh (a suffixed one when taken), full keys and
//! key prefixes that always work, the mesh context, renames without a restart, and broadcasts that
//! count live recipients only.

use mesh_testkit::{BrokerProcess, TestHome};
use serde_json::{Value, json};

use super::*;

/// Runs `args --json` expecting failure with `exit`; returns the JSON error object.
fn json_error(home: &TestHome, args: &[&str], exit: i32) -> Value {
    let mut all = args.to_vec();
    all.push("--json");
    let out = home.run(&all);
    assert_eq!(out.status.code(), Some(exit), "{}", home.report(&all, &out));
    let v: Value = serde_json::from_slice(&out.stderr)
        .unwrap_or_else(|e| panic!("stderr of {all:?} is not one JSON object ({e}): {}", home.report(&all, &out)));
    v["error"].clone()
}

/// Two members who both default to the same name, in two meshes: alice's local mesh and a team
/// mesh on a broker. Returns (alice, bob, bob's key).
fn same_name_in_two_meshes(broker: &BrokerProcess) -> (TestHome, TestHome, String) {
    let (alice, bob) = (TestHome::new(MESH), TestHome::new(MESH));
    alice.ok(&["init", "--name", "root"]);
    bob.ok(&["init", "--name", "root"]);
    alice.ok(&["daemon", "up"]);
    bob.ok(&["daemon", "up", "--no-embedded"]);
    // The local mesh: bob's name is taken, and not being at a terminal he gets root-2, and is told.
    let token = alice.ok(&["invite"]).trim().to_owned();
    let out = bob.run(&["join", &token]);
    assert!(out.status.success(), "{}", bob.report(&["join"], &out));
    let note = String::from_utf8_lossy(&out.stderr);
    assert!(note.contains("\"root\" is taken") && note.contains("\"root-2\""), "{note}");
    // The team mesh on a broker, where bob asks for a name of his own.
    alice.ok(&["create", "team", "--broker", &broker.url]);
    let token = alice.ok(&["invite", "--mesh", "team"]).trim().to_owned();
    let joined = bob.json(&["join", &token, "--name", "bob"]);
    assert_eq!((joined["my_name"].as_str(), joined["name_was_taken"].is_null()), (Some("bob"), true));
    let key = bob.json(&["daemon", "status"])["member"]["key"].as_str().expect("key").to_owned();
    alice.eventually_json("bob in both of alice's rosters", &["peers"], |v| {
        v.as_array().expect("array").iter().filter(|p| p["key"] == key.as_str()).count() == 2
    });
    (alice, bob, key)
}

#[test]
fn a_full_key_a_prefix_and_a_name_always_reach_a_peer_in_two_meshes() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob, key) = same_name_in_two_meshes(&broker);
    // The names differ per mesh (root-2, bob); the key is the same peer in both.
    for (target, body) in [(key.as_str(), "by full key"), (&key[..8], "by short key"), ("bob", "by name")] {
        let sent = alice.json(&["send", target, body]);
        assert_eq!(sent["target"]["address"], key.as_str(), "{target}");
        wait_for_message(&bob, body);
    }
    // A name that means two different peers is an error with both as candidates, never a guess.
    let local = alice.json(&["meshes"])[0]["name"].as_str().expect("local mesh").to_owned();
    let _other_bob = alice.launch("bob", Some(&local));
    let err = json_error(&alice, &["send", "bob", "which one?"], 1);
    assert_eq!(err["code"], "ambiguous_target");
    assert_eq!(err["candidates"].as_array().expect("candidates").len(), 2, "{err}");
    assert!(err["hint"].as_str().expect("hint").contains("key prefix"), "{err}");
    // The key still reaches bob.
    alice.ok(&["send", &key[..8], "still you"]);
    wait_for_message(&bob, "still you");
}

#[test]
fn the_mesh_context_chooses_where_fan_outs_go_and_what_lists_show() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob, _) = same_name_in_two_meshes(&broker);
    let local = alice.json(&["meshes"])[0]["name"].as_str().expect("local mesh").to_owned();

    // Without a context, `*` could mean either mesh: refused, with the meshes listed.
    let err = json_error(&alice, &["send", "*", "everyone?"], 1);
    assert_eq!(err["code"], "ambiguous_target");
    assert!(err["message"].as_str().expect("message").contains("team"), "{err}");
    assert!(err["hint"].as_str().expect("hint").contains("mesh use"), "{err}");

    // `mesh use team`: fan-outs go there, lists show it only.
    alice.ok(&["use", "team"]);
    assert_eq!(alice.json(&["use"])["mesh"], "team");
    assert_eq!(alice.json(&["meshes"]).as_array().expect("array").iter().filter(|m| m["context"] == true).count(), 1);
    let sent = alice.json(&["send", "*", "standup in 5"]);
    assert_eq!(sent["mesh"], "team");
    wait_for_message(&bob, "standup in 5");
    let peers = alice.json(&["peers"]);
    assert!(peers.as_array().expect("array").iter().all(|p| p["mesh"] == "team"), "{peers}");
    let everywhere = alice.json(&["peers", "--all-meshes"]);
    assert!(everywhere.as_array().expect("array").iter().any(|p| p["mesh"] == local.as_str()));

    // MESH_CONTEXT overrides it for one shell.
    let out = alice.cmd(&["send", "*", "local news", "--json"]).env("MESH_CONTEXT", &local).output().expect("send");
    assert!(out.status.success(), "{}", alice.report(&["send"], &out));
    let sent: Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(sent["mesh"], local.as_str());

    // A context naming a mesh that does not exist is a clear error.
    let out = alice.cmd(&["send", "bob", "x", "--json"]).env("MESH_CONTEXT", "nope").output().expect("send");
    let err: Value = serde_json::from_slice(&out.stderr).expect("json");
    assert_eq!((out.status.code(), err["error"]["code"].as_str()), (Some(1), Some("unknown_mesh")));

    // With the context on team, a peer only in the local mesh is named as such.
    let only_local = alice.launch("helper", Some(&local));
    let err = json_error(&alice, &["send", "helper", "x"], 1);
    assert!(err["hint"].as_str().expect("hint").contains(&format!("--mesh {local}")), "{err}");
    drop(only_local);

    alice.ok(&["use", "--clear"]);
    assert!(alice.json(&["use"])["mesh"].is_null());
}

#[test]
fn a_rename_takes_effect_at_once_and_a_taken_name_is_refused() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = sessions::team(&broker);
    let err = json_error(&bob, &["rename", "alice", "--mesh", "team"], 1);
    assert_eq!(err["code"], "name_taken");
    assert!(err["message"].as_str().expect("message").contains("member alice"), "{err}");
    let err = json_error(&bob, &["rename", "ALİCE\u{200B}", "--mesh", "team"], 1);
    assert_eq!(err["code"], "invalid_name", "{err}");

    let renamed = bob.json(&["rename", "robert", "--mesh", "team"]);
    assert_eq!(renamed["my_name"], "robert");
    wait_for_peer(&alice, "robert");
    alice.ok(&["send", "robert", "hello robert"]);
    let got = wait_for_message(&bob, "hello robert");
    assert_eq!(got["kind"], "direct");
    bob.ok(&["send", "alice", "signed, robert"]);
    assert_eq!(wait_for_message(&alice, "signed, robert")["from_name"], "robert");
    // The new name holds across a restart of the daemon.
    bob.ok(&["daemon", "down"]);
    bob.ok(&["daemon", "up", "--no-embedded"]);
    bob.eventually_json("bob back online", &["daemon", "status"], |v| {
        v["meshes"][0]["connection"]["state"] == "online"
    });
    assert_eq!(bob.json(&["meshes"])[0]["my_name"], "robert");
}

#[test]
fn broadcasts_count_members_and_live_sessions_and_groups_are_checked_at_send_time() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = sessions::team(&broker);
    // A session that ran and ended is no recipient of a broadcast.
    let mut gone = bob.launch("gone", None);
    wait_for_peer(&alice, "gone");
    gone.kill();
    alice.eventually_json("gone ended in alice's roster", &["peers"], |v| {
        v.as_array().expect("array").iter().any(|p| p["name"] == "gone" && p["ended_at"].is_u64())
    });
    // A session whose command exits at once ends the same way everywhere, whatever order the
    // broker's frames about it arrive in.
    bob.ok(&["launch", "--name", "quick", "--", "true"]);
    alice.eventually_json("quick ended in alice's roster", &["peers"], |v| {
        v.as_array().expect("array").iter().any(|p| p["name"] == "quick" && p["ended_at"].is_u64())
    });
    let _live = bob.launch("live", None);
    wait_for_peer(&alice, "live");
    let sent = alice.json(&["send", "*", "to everyone live", "--wait", "delivered", "--timeout", "20s"]);
    assert_eq!(sent["wait"]["reached"], true, "{sent}");
    assert_eq!((sent["wait"]["recipients"].clone(), sent["wait"]["delivered_count"].clone()), (json!(2), json!(2)));

    // A group nobody is in is refused when the send is made, not dead later.
    let err = json_error(&alice, &["send", "@nogroup", "anyone?"], 1);
    assert_eq!(err["code"], "unknown_target");
    bob.ok(&["group", "join", "ops"]);
    alice.eventually_json("bob in @ops in alice's roster", &["peers"], |v| {
        v.as_array().expect("array").iter().any(|p| p["name"] == "bob" && p["groups"] == json!(["ops"]))
    });
    alice.ok(&["send", "@ops", "ops only"]);
    wait_for_message(&bob, "ops only");
}

#[test]
fn a_session_name_taken_in_the_mesh_is_refused_at_launch() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = sessions::team(&broker);
    let _mine = alice.launch("reviewer", None);
    wait_for_peer(&bob, "reviewer");
    let out = bob
        .cmd(&["launch", "--name", "Reviewer", "--json", "--", "true"])
        .stdout(std::process::Stdio::null())
        .output()
        .expect("launch");
    assert_eq!(out.status.code(), Some(1));
    let err: Value = serde_json::from_slice(&out.stderr).expect("JSON error");
    assert_eq!(err["error"]["code"], "name_taken", "{err}");
    // A name of one's own still works.
    let _theirs = bob.launch("reviewer-2", None);
}

#[test]
fn a_session_acts_in_its_own_mesh_only_and_never_as_the_member() {
    let broker = BrokerProcess::start(MESH);
    let (alice, _bob) = sessions::team(&broker);
    let worker = alice.launch("worker", Some("team"));
    for (args, code) in [
        (&["invite", "--mesh", "team"][..], "unauthorized"),
        (&["daemon", "down"], "unauthorized"),
        (&["use", "team"], "unauthorized"),
        (&["group", "join", "ops", "--mesh", "elsewhere"], "bad_request"),
        (&["inbox", "--mesh", "elsewhere"], "bad_request"),
        (&["peers", "--mesh", "elsewhere"], "bad_request"),
    ] {
        let mut all = args.to_vec();
        all.push("--json");
        let out = worker.cmd(&all).output().expect("run");
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", String::from_utf8_lossy(&out.stdout));
        let err: Value = serde_json::from_slice(&out.stderr).expect("JSON error");
        assert_eq!(err["error"]["code"], code, "{args:?}: {err}");
    }
    assert!(alice.json(&["daemon", "status"])["pid"].is_u64(), "the daemon still runs");
    // A context exported in the shell does not follow the session in.
    let out = worker.cmd(&["send", "alice", "from the worker", "--json"]).env("MESH_CONTEXT", "elsewhere").output();
    let out = out.expect("run");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_name_that_is_another_peer_s_key_prefix_makes_it_ambiguous_instead_of_capturing_it() {
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = sessions::team(&broker);
    let bob_key = bob.json(&["daemon", "status"])["member"]["key"].as_str().expect("key").to_owned();
    // Eight hex digits (what `mesh peers` shows) cannot be a name at all.
    let err = json_error(&alice, &["rename", &bob_key[..8], "--mesh", "team"], 1);
    assert_eq!(err["code"], "invalid_name");
    // A shorter prefix can be a name; then that prefix means two peers and is refused as ambiguous.
    let _impostor = alice.launch(&bob_key[..6], Some("team"));
    wait_for_peer(&alice, &bob_key[..6]);
    let err = json_error(&alice, &["send", &bob_key[..6], "for bob?"], 1);
    assert_eq!(err["code"], "ambiguous_target", "{err}");
    // The full key, or a longer prefix, is still bob.
    let sent = alice.json(&["send", &bob_key[..8], "for bob"]);
    assert_eq!(sent["target"]["address"], bob_key.as_str());
}

#[test]
fn on_a_terminal_join_asks_for_a_name_and_for_another_when_it_is_taken() {
    let alice = TestHome::new(MESH);
    alice.ok(&["init", "--name", "root"]);
    alice.ok(&["daemon", "up"]);
    let bob = TestHome::new(MESH);
    bob.ok(&["init", "--name", "root"]);
    bob.ok(&["daemon", "up", "--no-embedded"]);
    let token = alice.ok(&["invite"]).trim().to_owned();
    let term = super::tui::Tmux::start(&format!(
        "env MESH_HOME={} {MESH} join {token}; echo EXITED $?; sleep 60",
        bob.path().display()
    ));
    term.wait_for("your name in this mesh:");
    term.keys("root");
    term.keys("Enter");
    let screen = term.wait_for("another name:");
    assert!(screen.contains("taken") && screen.contains("member root"), "{screen}");
    term.keys("carol");
    term.keys("Enter");
    term.wait_for("EXITED 0");
    assert_eq!(bob.json(&["meshes"])[0]["my_name"], "carol");
    wait_for_peer(&alice, "carol");
}

#[test]
fn offline_names_are_flagged_senders_are_named_by_key_and_nothing_happens_silently() {
    let mut broker = BrokerProcess::start(MESH);
    let (alice, bob) = sessions::team(&broker);
    let bob_key = bob.json(&["daemon", "status"])["member"]["key"].as_str().expect("key").to_owned();
    bob.ok(&["send", "alice", "from bob"]);
    wait_for_message(&alice, "from bob");

    // `--from` is a target: by name, prefix or key, it means bob's key; an unknown one is an error.
    for from in ["bob", &bob_key[..8], bob_key.as_str()] {
        let got = alice.json(&["inbox", "--from", from]);
        assert_eq!(ready_bodies(&got), ["from bob"], "--from {from}");
    }
    assert_eq!(json_error(&alice, &["inbox", "--from", "nobody"], 1)["code"], "unknown_target");

    // Leaving a group one is not in, joining a mesh again under another name: errors, not successes.
    assert_eq!(json_error(&bob, &["group", "leave", "nosuch"], 1)["code"], "not_found");
    let token = alice.ok(&["invite", "--mesh", "team"]).trim().to_owned();
    let err = json_error(&bob, &["join", &token, "--name", "robert"], 1);
    assert_eq!(err["code"], "conflict");
    assert!(err["hint"].as_str().expect("hint").contains("mesh rename"), "{err}");

    // With the broker gone, a name resolves from the roster as last seen, and the send says so.
    broker.kill9();
    alice.eventually_json("alice's link offline", &["daemon", "status"], |v| {
        v["meshes"][0]["connection"]["state"] != "online"
    });
    let sent = alice.json(&["send", "bob", "while offline"]);
    let warning = sent["warning"].as_str().expect("a warning");
    assert!(warning.contains("as last seen") && warning.contains(&bob_key[..8]), "{warning}");
    let by_key = alice.json(&["send", &bob_key, "by key, offline"]);
    assert!(by_key["warning"].is_null(), "a key is exact: {by_key}");
}
