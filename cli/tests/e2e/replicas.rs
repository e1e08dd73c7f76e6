//! Broker replicas on one PostgreSQL (started by the tests, or `MESH_TEST_POSTGRES_URL`): daemons on
//! different replicas exchange messages and receipts; replicas killed with SIGKILL under load and
//! PostgreSQL restarted under load lose and duplicate nothing; a database outage longer than the
//! heartbeat timeout takes no replica for dead.

use std::collections::HashMap;

use mesh_testkit::{BrokerProcess, TestHome};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::faults::send_until_accepted;
use super::*;

/// Leases short enough that an item leased by a killed replica goes out again within a round.
const REPLICA_OPTIONS: &[&str] = &["--lease", "3s"];

fn replicas(url: &str, n: usize) -> Vec<BrokerProcess> {
    (0..n).map(|_| BrokerProcess::replica(MESH, url, REPLICA_OPTIONS)).collect()
}

/// The replicas' addresses, starting from replica `first`: a member given this list connects there.
fn addresses_from(replicas: &[BrokerProcess], first: usize) -> String {
    let n = replicas.len();
    (0..n).map(|i| replicas[(first + i) % n].url.clone()).collect::<Vec<_>>().join(",")
}

/// A mesh on the replicas with `names` as members, member `i` connected first to replica `i % n`.
fn members(replicas: &[BrokerProcess], names: &[&str]) -> Vec<TestHome> {
    let homes: Vec<TestHome> = names.iter().map(|_| TestHome::new(MESH)).collect();
    for (home, name) in homes.iter().zip(names) {
        home.ok(&["init", "--name", name]);
        home.ok(&["daemon", "up", "--no-embedded"]);
    }
    homes[0].ok(&["create", "team", "--broker", &addresses_from(replicas, 0)]);
    let token = homes[0].ok(&["invite", "--mesh", "team", "--uses", "0"]).trim().to_owned();
    for (i, home) in homes.iter().enumerate().skip(1) {
        home.ok(&["join", &token, "--broker", &addresses_from(replicas, i)]);
    }
    for home in &homes {
        for name in names {
            wait_for_peer(home, name);
        }
    }
    homes
}

/// Alice on `first` only and bob on `second` only (one address each: nobody moves to the other
/// replica), bob's link up and a message of his delivered.
fn one_address_each(first: &BrokerProcess, second: &BrokerProcess) -> (TestHome, TestHome) {
    let (alice, bob) = (TestHome::new(MESH), TestHome::new(MESH));
    for (home, name) in [(&alice, "alice"), (&bob, "bob")] {
        home.ok(&["init", "--name", name]);
        home.ok(&["daemon", "up", "--no-embedded"]);
    }
    alice.ok(&["create", "team", "--broker", &first.url]);
    let token = alice.ok(&["invite", "--mesh", "team", "--uses", "0"]).trim().to_owned();
    bob.ok(&["join", &token, "--broker", &second.url]);
    // Bob's own link is up (his join's connection, which it superseded, has come and gone).
    bob.ok(&["send", "alice", "first", "--wait", "delivered", "--mesh", "team"]);
    wait_for_message(&alice, "first");
    (alice, bob)
}

/// How many of a replica's heartbeats have failed, from its `/metrics`.
fn failed_heartbeats(replica: &BrokerProcess) -> u64 {
    let url = replica.metrics.as_deref().expect("started with --metrics-listen");
    let out = std::process::Command::new("curl").args(["-sf", "--max-time", "5", url]).output().expect("curl");
    assert!(out.status.success(), "GET {url} failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.lines()
        .find_map(|l| l.strip_prefix("mesh_broker_replica_heartbeats_total{result=\"failed\"} "))
        .map_or(0, |n| n.trim().parse().expect("a count"))
}

#[test]
fn members_on_three_replicas_exchange_messages_broadcasts_and_receipts() {
    let Some(url) = mesh_testkit::postgres::database() else { return };
    let replicas = replicas(&url, 3);
    let homes = members(&replicas, &["alice", "bob", "carol"]);
    let (alice, bob, carol) = (&homes[0], &homes[1], &homes[2]);
    // Each link says which of the addresses it is on.
    for (i, home) in homes.iter().enumerate() {
        let status = home.eventually_json("the link online", &["daemon", "status"], |v| {
            v["meshes"][0]["connection"]["state"] == "online"
        });
        assert_eq!(status["meshes"][0]["connection"]["address"], replicas[i].url.as_str(), "{status}");
    }
    // Each waits for its `delivered` receipt, which crosses back from the recipient's replica.
    alice.ok(&["send", "bob", "alice to bob", "--wait", "delivered", "--mesh", "team"]);
    bob.ok(&["send", "carol", "bob to carol", "--wait", "delivered", "--mesh", "team"]);
    carol.ok(&["send", "alice", "carol to alice", "--wait", "delivered", "--mesh", "team"]);
    wait_for_message(bob, "alice to bob");
    wait_for_message(carol, "bob to carol");
    wait_for_message(alice, "carol to alice");
    alice.ok(&["send", "*", "to everyone", "--wait", "delivered", "--mesh", "team"]);
    wait_for_message(bob, "to everyone");
    wait_for_message(carol, "to everyone");
    // Read receipts cross too.
    bob.ok(&["inbox", "ack", "--all"]);
    alice.eventually_json("bob's read receipt", &["outbox", "--limit", "100"], |v| {
        v.as_array().expect("array").iter().any(|r| r["body"] == "alice to bob" && r["read_at"].is_u64())
    });
}

/// Who a round kills.
#[derive(Clone, Copy, Debug)]
enum Victim {
    Sender,
    Recipient,
    /// The replica one of the two is connected to first.
    Replica(usize),
}

#[test]
fn random_kill_9_of_replicas_and_daemons_under_load_loses_and_duplicates_nothing() {
    let Some(url) = mesh_testkit::postgres::database() else { return };
    let rounds: usize = std::env::var("MESH_FAULT_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    let seed: u64 =
        std::env::var("MESH_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(mesh_proto::now_ms);
    eprintln!("replica fault suite: {rounds} rounds on 3 replicas, MESH_FAULT_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut replicas = replicas(&url, 3);
    let homes = members(&replicas, &["alice", "bob"]);
    let (alice, bob) = (&homes[0], &homes[1]);

    let mut sent = Vec::new();
    for round in 0..rounds {
        let victim = match rng.gen_range(0..4) {
            0 => Victim::Sender,
            1 => Victim::Recipient,
            // Alice starts on replica 0, bob on replica 1.
            n => Victim::Replica(n - 2),
        };
        let kill_at = rng.gen_range(0..super::faults::PER_ROUND);
        for i in 0..super::faults::PER_ROUND {
            if i == kill_at {
                match victim {
                    Victim::Sender => {
                        alice.kill9_daemon();
                        alice.ok(&["daemon", "up", "--no-embedded"]);
                    }
                    Victim::Recipient => bob.kill9_daemon(),
                    Victim::Replica(r) => replicas[r].kill9(),
                }
            }
            let body = format!("round {round} message {i}");
            send_until_accepted(&rt, alice, &format!("replica-fault-{seed}-{round}-{i}"), &body);
            sent.push(body);
        }
        match victim {
            Victim::Recipient => {
                bob.ok(&["daemon", "up", "--no-embedded"]);
            }
            Victim::Replica(r) => replicas[r].start_again(MESH),
            Victim::Sender => {}
        }
        eprintln!("round {round}: killed {victim:?} after {kill_at} sends");
    }
    assert_exactly_once(bob, &sent, seed);
    alice.eventually_json("every outbox row terminal", &["outbox", "--limit", "100000"], |v| {
        v.as_array().expect("array").iter().all(|r| r["status"] == "done")
    });
}

#[test]
fn postgres_restarted_under_load_loses_and_duplicates_nothing() {
    // A server of this test's own: it is stopped and started again.
    let Some(pg) = mesh_testkit::postgres::Postgres::start() else { return };
    let url = pg.create_database();
    let replicas = replicas(&url, 2);
    let homes = members(&replicas, &["alice", "bob"]);
    let (alice, bob) = (&homes[0], &homes[1]);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let mut sent = Vec::new();
    for round in 0..2 {
        for i in 0..super::faults::PER_ROUND {
            if i == super::faults::PER_ROUND / 2 {
                // Killed, not shut down: it recovers from its WAL.
                pg.stop(false);
                pg.start_server();
            }
            let body = format!("pg round {round} message {i}");
            // The daemons keep every send in their outboxes while the brokers cannot store it.
            send_until_accepted(&rt, alice, &format!("pg-restart-{round}-{i}"), &body);
            sent.push(body);
        }
    }
    assert_exactly_once(bob, &sent, 0);
    // Both replicas are still serving: a new message through each reaches the other member.
    bob.ok(&["send", "alice", "after the restart", "--wait", "delivered", "--mesh", "team"]);
    wait_for_message(alice, "after the restart");
    drop(replicas);
}

/// PostgreSQL down for longer than a replica's heartbeat timeout: when it is back every replica's
/// heartbeat is old, and none may take another for dead (which would announce its members offline
/// and free its leases under it). Sends made during the outage wait in the daemon's outbox and arrive
/// once each.
#[test]
fn a_database_outage_longer_than_the_heartbeat_timeout_buries_no_replica() {
    let Some(pg) = mesh_testkit::postgres::Postgres::start() else { return };
    let url = pg.create_database();
    let options = [REPLICA_OPTIONS, &["--metrics-listen", "127.0.0.1:0"]].concat();
    let replicas: Vec<BrokerProcess> = (0..2).map(|_| BrokerProcess::replica(MESH, &url, &options)).collect();
    let (alice, bob) = &one_address_each(&replicas[0], &replicas[1]);
    // A replica taken for dead registers again, under its number but with a new start time.
    let ids = || mesh_testkit::postgres::query(&url, "SELECT id, started_at FROM replicas ORDER BY id");
    let registered = ids();
    assert_eq!(registered.lines().count(), 2, "{registered}");
    pg.stop(true);
    let mut sent = Vec::new();
    for i in 0..5 {
        let body = format!("during the outage {i}");
        // Committed to the daemon's outbox: the brokers cannot store it yet.
        alice.ok(&["send", "bob", &body, "--mesh", "team"]);
        sent.push(body);
    }
    // The outage itself: longer than the 15 s after which a silent replica is dead. Heartbeats go
    // every 5 s: four failed in a row, and each replica's last one through is over 15 s old.
    let failed = replicas.iter().map(failed_heartbeats).collect::<Vec<_>>();
    let outage = std::time::Duration::from_secs(90);
    mesh_testkit::eventually("four heartbeats failed on each replica", outage, || {
        replicas.iter().zip(&failed).all(|(r, before)| failed_heartbeats(r) >= before + 4).then_some(())
    });
    pg.start_server();
    let back = mesh_proto::now_ms();
    // Both replicas' heartbeats have gone through since (a replica buries others, if ever, at a
    // heartbeat): by now a burial would have happened.
    mesh_testkit::eventually("both replicas' heartbeats through after the outage", mesh_testkit::WAIT, || {
        let fresh = format!("SELECT COUNT(*) FROM replicas WHERE heartbeat_at > {back}");
        (mesh_testkit::postgres::query(&url, &fresh).trim() == "2").then_some(())
    });
    assert_eq!(ids(), registered, "a replica was taken for dead and registered again");
    assert_exactly_once(bob, &sent, 0);
    let connected = mesh_testkit::postgres::query(&url, "SELECT COUNT(DISTINCT replica) FROM connections");
    assert_eq!(connected.trim(), "2", "each replica still holds its member's connection");
    bob.ok(&["send", "alice", "after the outage", "--wait", "delivered", "--mesh", "team"]);
    wait_for_message(alice, "after the outage");
}

/// Every body in `sent` is in `home`'s inbox exactly once, and nothing else.
fn assert_exactly_once(home: &TestHome, sent: &[String], seed: u64) {
    let inbox = home.eventually_json(
        &format!("all {} messages at the recipient (seed {seed})", sent.len()),
        &["inbox", "--limit", "100000"],
        |v| ready_bodies(v).len() >= sent.len(),
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    for b in ready_bodies(&inbox) {
        *counts.entry(b).or_default() += 1;
    }
    for body in sent {
        assert_eq!(counts.get(body), Some(&1), "{body:?} arrived {:?} times (seed {seed})", counts.get(body));
    }
    assert_eq!(counts.len(), sent.len(), "messages nobody sent arrived (seed {seed})");
}

/// A replica paused (SIGSTOP) past the heartbeat timeout is taken for dead: the others see its
/// member go offline. Resumed, it claims its connections again and the member is seen online again.
#[test]
fn a_paused_replica_s_members_go_offline_and_come_back_when_it_resumes() {
    let Some(url) = mesh_testkit::postgres::database() else { return };
    let replicas = replicas(&url, 2);
    let (alice, bob) = one_address_each(&replicas[0], &replicas[1]);
    let bob_is = |online: bool| {
        move |v: &serde_json::Value| {
            v.as_array().expect("array").iter().any(|p| p["name"] == "bob" && p["online"] == online)
        }
    };
    alice.eventually_json("bob online", &["peers"], bob_is(true));
    replicas[1].signal(nix::sys::signal::Signal::SIGSTOP);
    // Buried after its heartbeat is 15 s old (checked every 5 s).
    let burial = std::time::Duration::from_secs(60);
    mesh_testkit::eventually("bob seen offline once his replica is taken for dead", burial, || {
        bob_is(false)(&alice.json(&["peers"])).then_some(())
    });
    replicas[1].signal(nix::sys::signal::Signal::SIGCONT);
    mesh_testkit::eventually("bob seen online again once his replica resumes", burial, || {
        bob_is(true)(&alice.json(&["peers"])).then_some(())
    });
    // And messages still flow both ways.
    bob.ok(&["send", "alice", "after the pause", "--wait", "delivered", "--mesh", "team"]);
    wait_for_message(&alice, "after the pause");
}

/// A broker address that does not know the mesh (a replica started on another database by mistake)
/// is passed over for the next one, by `mesh join` and by the running link.
#[test]
fn an_address_that_does_not_know_the_mesh_is_passed_over() {
    let Some(url) = mesh_testkit::postgres::database() else { return };
    let replicas = replicas(&url, 1);
    let stray = BrokerProcess::start(MESH);
    let (alice, bob) = (TestHome::new(MESH), TestHome::new(MESH));
    for (home, name) in [(&alice, "alice"), (&bob, "bob")] {
        home.ok(&["init", "--name", name]);
        home.ok(&["daemon", "up", "--no-embedded"]);
    }
    alice.ok(&["create", "team", "--broker", &replicas[0].url]);
    let token = alice.ok(&["invite", "--mesh", "team", "--uses", "0"]).trim().to_owned();
    // Through the stray one alone: refused, naming where it looked.
    let said = bob.fails(&["join", &token, "--broker", &stray.url], 1);
    assert!(said.contains(&format!("the mesh is not on the broker at {}", stray.url)), "{said}");
    let list = format!("{},{}", stray.url, replicas[0].url);
    bob.ok(&["join", &token, "--broker", &list]);
    let status = bob.eventually_json("bob's link online", &["daemon", "status"], |v| {
        v["meshes"][0]["connection"]["state"] == "online"
    });
    assert_eq!(status["meshes"][0]["connection"]["address"], replicas[0].url.as_str(), "{status}");
    bob.ok(&["send", "alice", "through the right one", "--wait", "delivered", "--mesh", "team"]);
    wait_for_message(&alice, "through the right one");
    // Joining again through another address changes nothing, and says so.
    let said = bob.fails(&["join", &token, "--broker", &replicas[0].url], 1);
    assert!(said.contains("--broker was not applied"), "{said}");
}
