//! Connections that never authenticate cost a bounded amount: a real broker process flooded with
//! WebSocket upgrades that never say hello. A mesh's owner sets its limits within the broker's.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use mesh_testkit::{BrokerProcess, WAIT, eventually};

use super::*;

/// The bound docs/operations.md states for the broker with its default admission limits.
const FLOOD_BOUND: u64 = 64 * 1024 * 1024;

/// Opens a connection, asks for the WebSocket upgrade, and returns it with the status code.
fn upgrade(port: u16) -> Option<(TcpStream, u16)> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(
        b"GET /v1/ws HTTP/1.1\r\nHost: localhost\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
          Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
    )
    .ok()?;
    let mut line = String::new();
    BufReader::new(s.try_clone().ok()?).read_line(&mut line).ok()?;
    let code = line.split_whitespace().nth(1)?.parse().ok()?;
    Some((s, code))
}

#[test]
fn two_thousand_connections_that_never_say_hello_stay_under_the_memory_bound_and_keep_no_one_out() {
    // One address may open them as fast as it likes and take every place, to measure the bound in all.
    let broker = BrokerProcess::start_with(
        MESH,
        &["--max-pending-per-address", "100000", "--handshakes-per-sec-per-address", "100000"],
    );
    let before = broker.rss_bytes();
    let started = Instant::now();
    let mut held = Vec::new();
    for _ in 0..2000 {
        match upgrade(broker.port) {
            Some((s, 101)) => held.push(s),
            other => panic!("unexpected answer: {:?}", other.map(|(_, c)| c)),
        }
    }
    let peak = broker.rss_bytes();
    eprintln!(
        "flood: 2000 upgrades in {:?}; broker RSS {} → {} MiB",
        started.elapsed(),
        before / (1 << 20),
        peak / (1 << 20)
    );
    // The newest 256 wait for their hello; each older one gave its place up and was closed.
    let mut oldest = held.swap_remove(0);
    let mut buf = [0u8; 4096];
    let closed = loop {
        match std::io::Read::read(&mut oldest, &mut buf) {
            Ok(0) => break true,
            Ok(_) => continue,
            Err(_) => break false,
        }
    };
    assert!(closed, "the longest-waiting connection was closed to make room");
    assert!(peak < FLOOD_BOUND, "broker RSS {} MiB with the flood held", peak / (1 << 20));
    // While the flood still holds every place, someone who does say hello gets in.
    let home = mesh_testkit::TestHome::new(MESH);
    home.ok(&["init", "--name", "alice"]);
    home.ok(&["daemon", "up", "--no-embedded"]);
    home.ok(&["create", "team", "--broker", &broker.url]);
    drop(held);
}

#[test]
fn a_daemon_fetches_a_roster_longer_than_a_page_whole() {
    let broker = BrokerProcess::start_with(MESH, &["--roster-page", "2"]);
    let (alice, bob) = sessions::team(&broker);
    let _sessions: Vec<_> = ["s1", "s2", "s3"].iter().map(|n| bob.launch(n, None)).collect();
    // Restarted, alice's daemon gets a first page of 2 in its welcome and fetches the rest.
    alice.ok(&["daemon", "down"]);
    alice.ok(&["daemon", "up", "--no-embedded"]);
    alice.eventually_json("all five in the roster", &["peers"], |v| v.as_array().expect("array").len() == 5);
    alice.ok(&["send", "s3", "found on the last page"]);
}

#[test]
fn an_owner_sets_the_mesh_s_limits_and_a_member_cannot() {
    let broker = BrokerProcess::start_with(MESH, &["--max-sessions-per-member", "8"]);
    let (alice, bob) = sessions::team(&broker);
    let shown = alice.json(&["limits"]);
    assert_eq!(
        (&shown["limits"]["sessions_per_member"], &shown["broker"]["sessions_per_member"]),
        (&8.into(), &8.into())
    );
    assert_eq!(shown["can_change"], true, "{shown}");
    assert_eq!(bob.json(&["limits"])["can_change"], false);

    // A member is told who can; a value outside the broker's range is refused by the broker.
    let err = bob.fails(&["limits", "--sessions-per-member", "1"], 1);
    assert!(err.contains("only its owner or an admin"), "{err}");
    let err = alice.fails(&["limits", "--sessions-per-member", "9"], 1);
    assert!(err.contains("limit_out_of_range") && err.contains("1 to 8"), "{err}");
    alice.fails(&["limits", "--sessions-per-member", "0"], 2);

    // The owner allows one session per member: bob's second is refused at the broker, and says why.
    let set = alice.json(&["limits", "--sessions-per-member", "1"]);
    assert_eq!(set["limits"]["sessions_per_member"], 1, "{set}");
    let _first = bob.launch("s1", None);
    // The second launch fails with the reason, and runs nothing.
    let err = bob.fails(&["launch", "--name", "s2", "--", "sh", "-c", "echo RAN"], 1);
    assert!(err.contains("too_many_sessions") && !err.contains("RAN"), "{err}");
    assert!(err.contains("mesh limits"), "says where the limit comes from: {err}");
    // Settings live at the broker: a restarted daemon reads them back from its welcome.
    alice.ok(&["daemon", "down"]);
    alice.ok(&["daemon", "up", "--no-embedded"]);
    alice.eventually_json("the limits after a restart", &["daemon", "status"], |v| {
        v["meshes"][0]["connection"]["state"] == "online"
    });
    assert_eq!(alice.json(&["limits"])["limits"]["sessions_per_member"], 1);
    let reset = alice.json(&["limits", "--reset"]);
    assert_eq!(reset["limits"]["sessions_per_member"], 8, "{reset}");
}

/// One HTTP/1.1 request on a kept-open IPC connection; returns the status code and the body.
fn http(stream: &mut std::os::unix::net::UnixStream, method: &str, path: &str, body: &str) -> (u16, String) {
    use std::io::Read;
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: mesh\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).expect("write request");
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status).expect("status line");
    let code = status.split_whitespace().nth(1).and_then(|c| c.parse().ok()).expect("a status code");
    let mut length = 0;
    loop {
        let mut line = String::new();
        reader.read_line(&mut line).expect("header");
        if line == "\r\n" {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            length = value.trim().parse().expect("length");
        }
    }
    let mut body = vec![0; length];
    reader.read_exact(&mut body).expect("body");
    (code, String::from_utf8(body).expect("utf-8"))
}

/// Out of file descriptors, the daemon still answers the IPC connections it has and keeps its broker
/// links; new clients wait, and are served once descriptors are free again.
#[test]
fn a_daemon_out_of_file_descriptors_keeps_serving_its_connections_and_links() {
    use std::os::unix::net::UnixStream;
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = sessions::team(&broker);
    alice.ok(&["daemon", "down"]);
    // Alice's daemon again, with at most 64 descriptors (it uses about 25).
    let mesh = alice.cmd(&[]);
    let mut up = std::process::Command::new("sh");
    up.args(["-c", "ulimit -n 64 && exec \"$0\" daemon up --no-embedded"]).arg(mesh.get_program());
    for (key, value) in mesh.get_envs() {
        match value {
            Some(v) => up.env(key, v),
            None => up.env_remove(key),
        };
    }
    let out = up.output().expect("mesh daemon up");
    assert!(out.status.success(), "{}", alice.report(&["daemon", "up"], &out));
    alice.eventually_json("alice online", &["daemon", "status"], |v| v["meshes"][0]["connection"]["state"] == "online");

    let socket = alice.paths().socket_path();
    let mut kept = UnixStream::connect(&socket).expect("connect");
    assert_eq!(http(&mut kept, "GET", mesh_ipc::routes::STATUS, "").0, 200);
    // More clients than descriptors left: the daemon runs out while accepting them.
    let flood: Vec<UnixStream> = (0..100).map(|_| UnixStream::connect(&socket).expect("connect")).collect();
    eventually("the daemon to run out of descriptors", WAIT, || {
        alice.log_tail(200).contains("Too many open files").then_some(())
    });

    // Meanwhile the kept connection is answered, and a send over it reaches bob over the broker link.
    let (code, status) = http(&mut kept, "GET", mesh_ipc::routes::STATUS, "");
    assert_eq!(code, 200, "{status}");
    assert!(status.contains(r#""state":"online""#), "{status}");
    let send = r#"{"client_message_id":"fd-1","to":"bob","body":"sent while out of descriptors"}"#;
    let (code, answer) = http(&mut kept, "POST", mesh_ipc::routes::SEND, send);
    assert_eq!(code, 200, "{answer}");
    bob.eventually_json("bob has the message", &["inbox"], |v| {
        v.as_array().expect("array").iter().any(|m| m["body"] == "sent while out of descriptors")
    });

    // Once the flood is gone, new clients are served again.
    drop(flood);
    eventually("a new client served", WAIT, || alice.run(&["daemon", "status"]).status.success().then_some(()));
}

/// Connections that never send a request (not even the HTTP upgrade), from one address: each takes a
/// place among those waiting for their request, a newer one the oldest's, and one address opens only
/// so many a second. The broker holds a bounded number of descriptors, and a member from another
/// address connects while they are held.
#[test]
fn silent_connections_from_one_address_hold_few_descriptors_and_keep_no_one_out() {
    let broker = BrokerProcess::start(MESH);
    let idle = broker.open_files();
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let addr: std::net::SocketAddr = format!("127.0.0.1:{}", broker.port).parse().expect("addr");
    let held: Vec<tokio::net::TcpStream> = rt.block_on(async {
        let mut held = Vec::new();
        for _ in 0..2000 {
            let socket = tokio::net::TcpSocket::new_v4().expect("socket");
            socket.bind("127.0.0.2:0".parse().expect("source")).expect("bind 127.0.0.2");
            if let Ok(s) = socket.connect(addr).await {
                held.push(s);
            }
        }
        held
    });
    // 64 waiting from that address at most, plus what the broker holds anyway (the ones it evicted
    // may take a moment to close on a loaded machine, while the flood's last connections still stand).
    let bound = idle + 64 + 16;
    let during = eventually("the broker's descriptors within bounds", WAIT, || {
        let n = broker.open_files();
        (n <= bound).then_some(n)
    });
    eprintln!("silent flood: {} connections opened; broker descriptors {idle} → {during}", held.len());
    let home = mesh_testkit::TestHome::new(MESH);
    home.ok(&["init", "--name", "alice"]);
    home.ok(&["daemon", "up", "--no-embedded"]);
    home.ok(&["create", "team", "--broker", &broker.url]);
    drop(held);
}
