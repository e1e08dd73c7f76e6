//! The fault suite: processes killed with SIGKILL at random points under load, and damaged databases.
//!
//! `MESH_FAULT_ROUNDS` (default 10) and `MESH_FAULT_SEED` (default: the clock) tune the random kills;
//! the seed is printed so a failure can be replayed.

use std::collections::HashMap;

use mesh_ipc::api::{SendRequest, SendResponse};
use mesh_ipc::{IpcClient, IpcError, routes};
use mesh_testkit::{BrokerProcess, TestHome, eventually};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::sessions::team;
use super::*;

pub const PER_ROUND: usize = 200;

#[derive(Clone, Copy, Debug)]
enum Victim {
    Sender,
    Recipient,
    Broker,
}

/// Sends through the sender's IPC socket like a client with an idempotency key: a send that finds the
/// daemon dead is repeated, with the same id, once it is back.
pub fn send_until_accepted(rt: &tokio::runtime::Runtime, home: &TestHome, cmid: &str, body: &str) {
    let client = IpcClient::new(&home.paths());
    let req =
        SendRequest { client_message_id: cmid.into(), to: "bob".into(), body: body.into(), mesh: Some("team".into()) };
    eventually(&format!("{cmid} accepted by the sender's daemon"), mesh_testkit::WAIT, || {
        match rt.block_on(client.post::<_, SendResponse>(routes::SEND, &req)) {
            Ok(_) => Some(()),
            Err(IpcError::Unreachable { .. }) => None,
            Err(e) => panic!("send {cmid} refused: {e}"),
        }
    });
}

fn restart(victim: Victim, alice: &TestHome, bob: &TestHome, broker: &mut BrokerProcess) {
    match victim {
        Victim::Sender => {
            alice.ok(&["daemon", "up", "--no-embedded"]);
        }
        Victim::Recipient => {
            bob.ok(&["daemon", "up", "--no-embedded"]);
        }
        Victim::Broker => broker.start_again(MESH),
    }
}

#[test]
fn random_kill_9_of_daemons_and_broker_under_load_loses_and_duplicates_nothing() {
    let rounds: usize = std::env::var("MESH_FAULT_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    kill_9_under_load(BrokerProcess::start(MESH), rounds);
}

/// The same over TLS: a self-signed broker, pinned; its certificate survives its restarts.
#[test]
fn random_kill_9_under_load_over_tls_loses_and_duplicates_nothing() {
    let rounds: usize = std::env::var("MESH_FAULT_ROUNDS").ok().and_then(|r| r.parse().ok()).unwrap_or(10);
    kill_9_under_load(
        BrokerProcess::start_with(MESH, &["--tls-self-signed", "localhost,127.0.0.1"]),
        rounds.div_ceil(2),
    );
}

/// Sends `rounds` × 200 messages from alice to bob, killing (SIGKILL) the sender's daemon, the
/// recipient's or the broker at a random point of each round; every message arrives exactly once.
fn kill_9_under_load(mut broker: BrokerProcess, rounds: usize) {
    let seed: u64 =
        std::env::var("MESH_FAULT_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(mesh_proto::now_ms);
    eprintln!("fault suite: {rounds} rounds on {}, MESH_FAULT_SEED={seed}", broker.url);
    let mut rng = StdRng::seed_from_u64(seed);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (alice, bob) = team(&broker);

    let mut sent = Vec::with_capacity(rounds * PER_ROUND);
    for round in 0..rounds {
        let victim = [Victim::Sender, Victim::Recipient, Victim::Broker][rng.gen_range(0..3)];
        let kill_at = rng.gen_range(0..PER_ROUND);
        for i in 0..PER_ROUND {
            if i == kill_at {
                match victim {
                    Victim::Sender => alice.kill9_daemon(),
                    Victim::Recipient => bob.kill9_daemon(),
                    Victim::Broker => broker.kill9(),
                }
                // The sender comes back at once (its client is retrying); the others after the round.
                if let Victim::Sender = victim {
                    restart(victim, &alice, &bob, &mut broker);
                }
            }
            let body = format!("round {round} message {i}");
            send_until_accepted(&rt, &alice, &format!("fault-{seed}-{round}-{i}"), &body);
            sent.push(body);
        }
        if !matches!(victim, Victim::Sender) {
            restart(victim, &alice, &bob, &mut broker);
        }
        eprintln!("round {round}: killed {victim:?} after {kill_at} sends");
    }

    let inbox = bob.eventually_json(
        &format!("all {} messages at the recipient (seed {seed})", sent.len()),
        &["inbox", "--limit", "100000"],
        |v| ready_bodies(v).len() >= sent.len(),
    );
    let mut counts: HashMap<String, usize> = HashMap::new();
    for b in ready_bodies(&inbox) {
        *counts.entry(b).or_default() += 1;
    }
    for body in &sent {
        assert_eq!(counts.get(body), Some(&1), "{body:?} arrived {:?} times (seed {seed})", counts.get(body));
    }
    assert_eq!(counts.len(), sent.len(), "messages nobody sent arrived (seed {seed})");
    alice.eventually_json("every outbox row terminal", &["outbox", "--limit", "100000"], |v| {
        v.as_array().expect("array").iter().all(|r| r["status"] == "done")
    });
}

#[test]
fn a_broker_restarted_while_deliveries_are_leased_redelivers_each_once() {
    let mut broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let sent: Vec<String> = (0..300).map(|i| format!("leased {i}")).collect();
    for (i, body) in sent.iter().enumerate() {
        send_until_accepted(&rt, &alice, &format!("leased-{i}"), body);
    }
    // Kill the recipient mid-intake (leases held, acks lost) and the broker with them.
    bob.eventually_json("deliveries under way", &["inbox", "--limit", "1000"], |v| !ready_bodies(v).is_empty());
    bob.kill9_daemon();
    broker.restart(MESH);
    bob.ok(&["daemon", "up", "--no-embedded"]);
    let inbox = bob.eventually_json("all 300", &["inbox", "--limit", "1000"], |v| ready_bodies(v).len() >= 300);
    let mut got = ready_bodies(&inbox);
    got.sort();
    let mut want = sent.clone();
    want.sort();
    assert_eq!(got, want, "each exactly once");
}

#[test]
fn a_corrupt_or_truncated_database_is_moved_aside_with_a_clear_error_and_nothing_else_is_lost() {
    for damage in ["garbage", "truncated", "emptied", "deleted"] {
        let home = TestHome::new(MESH);
        home.ok(&["init", "--name", "alice"]);
        home.ok(&["daemon", "up"]);
        home.ok(&["send", "alice", "before the damage"]);
        wait_for_message(&home, "before the damage");
        let key = home.json(&["daemon", "status"])["member"]["key"].clone();
        home.ok(&["daemon", "down"]);

        let db = home.paths().daemon_db();
        match damage {
            "garbage" => std::fs::write(&db, vec![0x5a; 64 * 1024]).expect("overwrite"),
            "truncated" => {
                let bytes = std::fs::read(&db).expect("read");
                std::fs::write(&db, &bytes[..bytes.len() / 3]).expect("truncate");
            }
            "emptied" => std::fs::write(&db, b"").expect("empty"),
            _ => {
                // Every file of the database, as `rm data/daemon.db*` would.
                for entry in std::fs::read_dir(&home.paths().data_dir).expect("data dir").filter_map(|e| e.ok()) {
                    if entry.file_name().to_string_lossy().starts_with("daemon.db") {
                        std::fs::remove_file(entry.path()).expect("delete");
                    }
                }
            }
        }
        let err = home.fails(&["daemon", "up"], 1);
        if matches!(damage, "garbage" | "truncated") {
            assert!(err.contains("corrupt") && err.contains("moved aside"), "{damage}: {err}");
            let aside: Vec<_> = std::fs::read_dir(&home.paths().data_dir)
                .expect("data dir")
                .filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy().starts_with("daemon.db.corrupt-"))
                .collect();
            assert!(!aside.is_empty(), "{damage}: the damaged file was kept");
        } else {
            assert!(err.contains("missing or empty") && err.contains("mesh daemon up --fresh"), "{damage}: {err}");
        }

        // It keeps refusing: the meshes and their keys were in that file, and nothing is recreated
        // behind the user's back. The error says how to recover or start fresh.
        let again = home.fails(&["daemon", "up"], 1);
        let recover = if matches!(damage, "garbage" | "truncated") { ".recover" } else { "from a backup" };
        assert!(again.contains(recover) && again.contains("mesh daemon up --fresh"), "{damage}: {again}");
        // Starting fresh is a choice: the old file is kept aside, the identity is the same.
        home.ok(&["daemon", "up", "--fresh"]);
        assert_eq!(home.json(&["daemon", "status"])["member"]["key"], key, "{damage}");
        if damage != "deleted" {
            assert!(home.paths().data_dir.join("corrupt").read_dir().expect("kept").count() >= 1, "{damage}");
        }
        home.ok(&["daemon", "down"]);
    }
}

#[test]
fn a_lost_embedded_broker_database_is_never_replaced_silently_and_fresh_brings_the_local_mesh_back() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "alice"]);
    home.ok(&["daemon", "up"]);
    let local = home.json(&["meshes"])[0].clone();
    home.ok(&["daemon", "down"]);
    std::fs::write(home.paths().embedded_broker_db(), vec![0x5a; 64 * 1024]).expect("overwrite");
    let err = home.fails(&["daemon", "up"], 1);
    assert!(err.contains("corrupt") && err.contains("moved aside"), "{err}");
    // The second start does not bring up an empty broker under the local mesh.
    let again = home.fails(&["daemon", "up"], 1);
    assert!(again.contains("embedded broker") && again.contains("mesh daemon up --fresh"), "{again}");
    assert!(again.contains(local["name"].as_str().expect("name")), "names the local mesh: {again}");
    // Fresh: the local mesh again, same id and name, working.
    home.ok(&["daemon", "up", "--fresh"]);
    let meshes = home.json(&["meshes"]);
    assert_eq!((&meshes[0]["id"], &meshes[0]["name"]), (&local["id"], &local["name"]));
    home.eventually_json("the local mesh online", &["daemon", "status"], |v| {
        v["meshes"][0]["connection"]["state"] == "online"
    });
    home.ok(&["send", "alice", "after the loss"]);
    wait_for_message(&home, "after the loss");
    assert!(home.paths().data_dir.join("corrupt").read_dir().expect("kept").count() >= 1);
}

/// Leases far shorter than the recipient's acks: each delivery is sent several times before its first
/// ack lands, so the recipient acks the same id again and again, while the sender (quick to ack its
/// receipts, and sending each message once the last is delivered) keeps the queue short. A repeated
/// ack must never remove another item: every message arrives exactly once, every send is receipted.
#[test]
fn lease_expiry_crossing_acks_under_load_loses_nothing() {
    let broker = BrokerProcess::start_with(MESH, &["--lease", "15ms"]);
    let (alice, bob) = team(&broker);
    bob.ok(&["daemon", "down"]);
    let up = bob.cmd(&["daemon", "up", "--no-embedded"]).env("MESH_FAULT_ACK_DELAY_MS", "100").output();
    assert!(up.expect("daemon up").status.success(), "daemon up with delayed acks");
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let sent: Vec<String> = (0..30).map(|i| format!("crossing {i}")).collect();
    for (i, body) in sent.iter().enumerate() {
        send_until_accepted(&rt, &alice, &format!("crossing-{i}"), body);
        alice.eventually_json(&format!("{body:?} receipted"), &["outbox", "--limit", "100000"], |v| {
            v.as_array().expect("array").iter().any(|r| r["body"] == *body && r["delivered_count"] == 1)
        });
    }
    let inbox = bob.eventually_json("all 30 at the recipient", &["inbox", "--limit", "100000"], |v| {
        ready_bodies(v).len() >= sent.len()
    });
    let mut got = ready_bodies(&inbox);
    got.sort();
    let mut want = sent.clone();
    want.sort();
    assert_eq!(got, want, "each exactly once");
}
