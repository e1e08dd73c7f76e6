//! Backups and restores of a daemon and of a broker, taken while traffic flows.

use std::collections::HashMap;

use mesh_ipc::api::{SendRequest, SendResponse};
use mesh_ipc::{IpcClient, routes};
use mesh_testkit::{BrokerProcess, TestHome, eventually};
use nix::sys::signal::Signal;

use super::sessions::team;
use super::*;

/// Sends `bodies` from `home`'s member to bob in mesh team, through the IPC socket, in order.
fn send_all(home: mesh_ipc::Home, prefix: &'static str, bodies: std::ops::Range<usize>) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        let client = IpcClient::new(&home);
        for i in bodies {
            let req = SendRequest {
                client_message_id: format!("{prefix}-{i}"),
                to: "bob".into(),
                body: format!("{prefix} {i}"),
                mesh: Some("team".into()),
            };
            rt.block_on(client.post::<_, SendResponse>(routes::SEND, &req)).expect("send accepted by the daemon");
        }
    })
}

fn outbox_counts(home: &TestHome) -> serde_json::Value {
    home.json(&["daemon", "status"])["outbox"].clone()
}

fn count(v: &serde_json::Value, field: &str) -> u64 {
    v[field].as_u64().unwrap_or_else(|| panic!("{field} in {v}"))
}

/// Each body of `inbox` with how often it arrived.
fn arrivals(inbox: &serde_json::Value) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for body in ready_bodies(inbox) {
        *counts.entry(body).or_default() += 1;
    }
    counts
}

#[test]
fn a_backup_taken_under_load_restores_into_a_fresh_home_whose_outbox_resumes_without_duplicates() {
    const TOTAL: usize = 3000;
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    let load = send_all(alice.paths(), "load", 0..TOTAL);

    // Under way: some accepted by the broker. Then the broker stops answering while the sends go on,
    // so that the backup surely holds sends the broker will have accepted by the time it is restored.
    eventually("500 sends accepted by the broker", mesh_testkit::WAIT, || {
        (count(&outbox_counts(&alice), "done") >= 500).then_some(())
    });
    broker.signal(Signal::SIGSTOP);
    eventually("300 sends waiting for the stopped broker", mesh_testkit::WAIT, || {
        let o = outbox_counts(&alice);
        (count(&o, "pending") + count(&o, "inflight") >= 300).then_some(())
    });
    let file = alice.path().join("alice.backup");
    let taken = alice.json(&["daemon", "backup", "--to", file.to_str().expect("utf-8")]);
    broker.signal(Signal::SIGCONT);
    let names: Vec<&str> =
        taken["files"].as_array().expect("files").iter().filter_map(|f| f["name"].as_str()).collect();
    assert_eq!(names, ["daemon.db", "identity.json"], "{taken}");
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(std::fs::metadata(&file).expect("backup").permissions().mode() & 0o777, 0o600);

    // The sends go on and are all accepted through the original daemon, which then dies.
    let member = alice.json(&["daemon", "status"])["member"]["key"].clone();
    load.join().expect("the load ran");
    eventually("every send accepted", mesh_testkit::WAIT, || {
        (count(&outbox_counts(&alice), "done") == TOTAL as u64).then_some(())
    });
    let refused = alice.run(&["daemon", "restore", "--from", file.to_str().expect("utf-8"), "--json"]);
    assert_eq!(refused.status.code(), Some(1), "a restore over a running daemon is refused");
    let error: serde_json::Value = serde_json::from_slice(&refused.stderr).expect("JSON error");
    assert_eq!(error["error"]["code"], "daemon_running", "{error}");
    alice.kill9_daemon();

    // The backup, restored into a fresh home, sends again what it had not seen accepted: the broker
    // recognises each as a duplicate, and the recipient gets every message exactly once.
    let restored = TestHome::new(MESH);
    restored.ok(&["daemon", "restore", "--from", file.to_str().expect("utf-8")]);
    restored.ok(&["daemon", "up", "--no-embedded"]);
    let status = restored.eventually_json("the restored outbox settled", &["daemon", "status"], |s| {
        let o = &s["outbox"];
        count(o, "pending") + count(o, "inflight") == 0 && s["meshes"][0]["connection"]["state"] == "online"
    });
    assert_eq!(status["member"]["key"], member, "the same member");
    let o = &status["outbox"];
    assert!(count(o, "done") >= 800, "the backup's rows, all accepted now: {o}");
    assert_eq!(count(o, "dead"), 0, "{status}");
    assert!(status["meshes"][0]["connection"]["last_error"].is_null(), "{status}");
    assert_eq!(count(&status["inbox"], "failed"), 0, "{status}");

    let inbox = bob.eventually_json(&format!("all {TOTAL} at bob"), &["inbox", "--limit", "100000"], |v| {
        ready_bodies(v).len() >= TOTAL
    });
    let got = arrivals(&inbox);
    for i in 0..TOTAL {
        assert_eq!(got.get(&format!("load {i}")), Some(&1), "load {i}");
    }
    assert_eq!(ready_bodies(&inbox).len(), TOTAL, "nothing twice, nothing else");
}

#[test]
fn a_restore_checks_the_whole_backup_before_replacing_anything() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "alice"]);
    home.ok(&["daemon", "up"]);
    home.ok(&["send", "alice", "kept"]);
    wait_for_message(&home, "kept");
    let file = home.path().join("good.backup");
    let path = file.to_str().expect("utf-8");
    home.ok(&["daemon", "backup", "--to", path]);
    // A backup never overwrites a file.
    let again = home.fails(&["daemon", "backup", "--to", path], 1);
    assert!(again.contains("already exists"), "{again}");
    home.ok(&["daemon", "down"]);
    let db = home.paths().daemon_db();
    let before = std::fs::read(&db).expect("db");

    let good = std::fs::read(&file).expect("backup");
    let damaged = [
        ("cut short", good[..good.len() / 2].to_vec()),
        ("a byte changed", {
            let mut b = good.clone();
            let at = b.len() - 2048;
            b[at] ^= 0x01;
            b
        }),
        ("not a backup", b"hello".to_vec()),
    ];
    for (what, bytes) in damaged {
        let bad = home.path().join("bad.backup");
        std::fs::write(&bad, bytes).expect("write");
        let err = home.fails(&["daemon", "restore", "--from", bad.to_str().expect("utf-8")], 1);
        assert!(err.contains("damaged") || err.contains("not a mesh backup"), "{what}: {err}");
        assert_eq!(std::fs::read(&db).expect("db"), before, "{what}: nothing replaced");
    }
    // A broker's backup is not a daemon's.
    let broker = BrokerProcess::start(MESH);
    let broker_backup = home.path().join("broker.backup");
    home.ok(&[
        "broker",
        "backup",
        "--db",
        broker.db.to_str().expect("utf-8"),
        "--to",
        broker_backup.to_str().expect("utf-8"),
    ]);
    let err = home.fails(&["daemon", "restore", "--from", broker_backup.to_str().expect("utf-8")], 1);
    assert!(err.contains("is a backup of a broker"), "{err}");
    // Nor is a daemon's database ever replaced by a broker's backup.
    let daemon_db = home.paths().daemon_db();
    let err = home.fails(
        &[
            "broker",
            "restore",
            "--db",
            daemon_db.to_str().expect("utf-8"),
            "--from",
            broker_backup.to_str().expect("utf-8"),
        ],
        1,
    );
    assert!(err.contains("is not a broker's database"), "{err}");
    assert_eq!(std::fs::read(&db).expect("db"), before, "nothing replaced");
    // Another member's home is not replaced by it without saying so.
    let other = TestHome::new(MESH);
    other.ok(&["init", "--name", "olga"]);
    let err = other.fails(&["daemon", "restore", "--from", path], 1);
    assert!(err.contains("replaces this home's identity"), "{err}");
    assert!(other.paths().identity_path().exists(), "olga's identity stays");
    // A session cannot take the member's backup (it would hold the member's keys).
    home.ok(&["daemon", "up"]);
    let session = home.launch("backup-taker", None);
    let out = session
        .cmd(&["daemon", "backup", "--to", home.path().join("s.backup").to_str().expect("utf-8")])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(!home.path().join("s.backup").exists());
    drop(session);
    home.ok(&["daemon", "down"]);
    // A restore of this home's own backup keeps what it replaced, and the home works on.
    let out = home.ok(&["daemon", "restore", "--from", path]);
    assert!(out.contains("the files it replaced are in"), "{out}");
    home.ok(&["daemon", "up"]);
    wait_for_message(&home, "kept");
    home.ok(&["send", "alice", "after the restore"]);
    wait_for_message(&home, "after the restore");
}

#[test]
fn a_broker_restored_from_its_backup_keeps_its_certificate_and_delivers_what_was_queued_once() {
    let mut broker = BrokerProcess::start_with(MESH, &["--tls-self-signed", "localhost,127.0.0.1"]);
    let (alice, bob) = team(&broker);
    bob.ok(&["daemon", "down"]);
    // Queued at the broker for bob, who is away.
    send_all(alice.paths(), "queued", 0..300).join().expect("sent");
    eventually("300 accepted", mesh_testkit::WAIT, || (count(&outbox_counts(&alice), "done") == 300).then_some(()));

    // The backup is taken while alice goes on sending.
    let load = send_all(alice.paths(), "during", 0..300);
    let file = alice.path().join("broker.backup");
    let db = broker.db.to_str().expect("utf-8").to_owned();
    let taken = alice.json(&["broker", "backup", "--db", &db, "--to", file.to_str().expect("utf-8")]);
    let names: Vec<&str> =
        taken["files"].as_array().expect("files").iter().filter_map(|f| f["name"].as_str()).collect();
    assert_eq!(names, ["broker.db", "broker-tls-cert.pem", "broker-tls-key.pem"]);
    load.join().expect("sent");
    let refused = alice.fails(&["broker", "restore", "--db", &db, "--from", file.to_str().expect("utf-8")], 1);
    assert!(refused.contains("stop it first"), "{refused}");

    // The machine's disk is lost: the database and the certificate pair are gone.
    broker.kill9();
    let dir = broker.db.parent().expect("dir").to_owned();
    for entry in std::fs::read_dir(&dir).expect("dir").filter_map(|e| e.ok()) {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(broker.db.file_name().expect("name").to_str().expect("utf-8")) || name.ends_with(".pem") {
            std::fs::remove_file(entry.path()).expect("remove");
        }
    }
    alice.ok(&["broker", "restore", "--db", &db, "--from", file.to_str().expect("utf-8")]);
    broker.start_again(MESH);

    // The pinned certificate is the same, and what was queued is delivered once.
    bob.ok(&["daemon", "up", "--no-embedded"]);
    let inbox = bob.eventually_json("the 300 queued", &["inbox", "--limit", "1000"], |v| {
        let got = arrivals(v);
        (0..300).all(|i| got.contains_key(&format!("queued {i}")))
    });
    let got = arrivals(&inbox);
    assert!(got.values().all(|n| *n == 1), "each once: {got:?}");
    assert!(got.keys().all(|b| b.starts_with("queued ") || b.starts_with("during ")), "{got:?}");
    alice.eventually_json("alice on the restored broker", &["daemon", "status"], |s| {
        s["meshes"][0]["connection"]["state"] == "online"
    });
}
