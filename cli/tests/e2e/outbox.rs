//! The outbox under faults: crashes of the sending daemon and of the broker, a broker away for a
//! while, one mesh down beside a healthy one, and retry of a stopped message.

use std::collections::HashMap;

use mesh_testkit::{BrokerProcess, TestHome};

use super::sessions::team;
use super::*;

/// Waits until `home`'s inbox holds every body of `expected`, then checks each is there exactly once.
fn all_exactly_once(home: &TestHome, expected: &[String]) {
    let inbox = home.eventually_json(
        &format!("{} messages in the inbox", expected.len()),
        &["inbox", "--limit", "10000"],
        |v| {
            let have = ready_bodies(v);
            expected.iter().all(|e| have.contains(e))
        },
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    for b in ready_bodies(&inbox) {
        *counts.entry(b).or_default() += 1;
    }
    for e in expected {
        assert_eq!(counts.get(e), Some(&1), "{e:?} arrived {:?} times", counts.get(e));
    }
}

fn send_many(home: &TestHome, to: &str, prefix: &str, n: usize) -> Vec<String> {
    (0..n)
        .map(|i| {
            let body = format!("{prefix} {i}");
            home.ok(&["send", to, &body]);
            body
        })
        .collect()
}

#[test]
fn kill_9_of_the_sending_daemon_with_rows_in_flight_loses_and_duplicates_nothing() {
    // A rate-limited broker keeps the drain busy for seconds, so the kill lands mid-drain.
    let broker = BrokerProcess::start_with(MESH, &["--sends-per-sec", "40", "--send-burst", "10"]);
    let (alice, bob) = team(&broker);
    let bodies = send_many(&alice, "bob", "crash-daemon", 120);
    alice.eventually_json("rows in flight", &["daemon", "status"], |v| v["outbox"]["inflight"].as_u64() > Some(0));
    alice.kill9_daemon();
    alice.ok(&["daemon", "up", "--no-embedded"]);
    all_exactly_once(&bob, &bodies);
    alice.eventually_json("every row done", &["outbox", "--limit", "1000"], |v| {
        v.as_array().expect("array").iter().all(|r| r["status"] == "done")
    });
}

#[test]
fn kill_9_of_the_broker_while_messages_flow_loses_and_duplicates_nothing() {
    let mut broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    let mut bodies = send_many(&alice, "bob", "before", 60);
    bob.eventually_json("some deliveries under way", &["inbox", "--limit", "1000"], |v| !ready_bodies(v).is_empty());
    broker.restart(MESH);
    bodies.extend(send_many(&alice, "bob", "after", 60));
    all_exactly_once(&bob, &bodies);
}

#[test]
fn sends_are_accepted_while_the_broker_is_unreachable_and_drain_when_it_returns() {
    let mut broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    broker.kill9();
    let bodies = send_many(&alice, "bob", "queued offline", 5);
    let status = alice.eventually_json("alice's link offline", &["daemon", "status"], |v| {
        v["meshes"][0]["connection"]["state"] != "online"
    });
    assert!(
        status["outbox"]["pending"].as_u64().unwrap_or(0) + status["outbox"]["inflight"].as_u64().unwrap_or(0) >= 1
    );
    broker.start_again(MESH);
    all_exactly_once(&bob, &bodies);
}

#[test]
fn one_mesh_s_broker_down_does_not_delay_another_mesh() {
    let mut first = BrokerProcess::start(MESH);
    let second = BrokerProcess::start(MESH);
    let (alice, bob) = team(&first);
    alice.ok(&["create", "other", "--broker", &second.url]);
    let token = alice.ok(&["invite", "--mesh", "other"]).trim().to_owned();
    bob.ok(&["join", &token]);
    alice.eventually_json("bob in the second mesh's roster", &["peers", "--mesh", "other"], |v| {
        v.as_array().expect("array").iter().any(|p| p["name"] == "bob")
    });

    first.kill9();
    alice.ok(&["send", "bob", "via the dead broker", "--mesh", "team"]);
    alice.ok(&["send", "bob", "via the healthy broker", "--mesh", "other"]);
    wait_for_message(&bob, "via the healthy broker");
    assert!(!ready_bodies(&bob.json(&["inbox"])).iter().any(|b| b == "via the dead broker"));
    first.start_again(MESH);
    wait_for_message(&bob, "via the dead broker");
}

#[test]
fn retrying_a_stopped_direct_message_sends_the_same_direct_message() {
    let mut broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    let carol = TestHome::new(MESH);
    carol.ok(&["init", "--name", "carol"]);
    carol.ok(&["daemon", "up", "--no-embedded"]);
    carol.ok(&["join", alice.ok(&["invite", "--mesh", "team"]).trim()]);
    wait_for_peer(&alice, "carol");

    broker.kill9();
    let sent = alice.json(&["send", "bob", "only for bob"]);
    let id = sent["outbox_id"].to_string();
    let aborted = alice.json(&["outbox", "abort", &id]);
    assert_eq!(aborted["status"], "aborted");
    let err = alice.fails(&["outbox", "abort", &id], 1);
    assert!(err.contains("only pending rows"), "{err}");
    let retried = alice.json(&["outbox", "retry", &id]);
    assert_eq!(retried["status"], "pending");
    assert_eq!(retried["target"], sent["target"], "the retry kept its target");

    broker.start_again(MESH);
    let row = wait_for_message(&bob, "only for bob");
    assert_eq!(row["kind"], "direct");
    alice.ok(&["send", "carol", "for carol, after"]);
    wait_for_message(&carol, "for carol, after");
    assert!(!ready_bodies(&carol.json(&["inbox"])).iter().any(|b| b == "only for bob"), "the retry became a broadcast");
}
