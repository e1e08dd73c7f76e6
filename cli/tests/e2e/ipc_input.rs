//! Bad input on the IPC socket gets a clear JSON 4xx and never hurts the daemon; sends are idempotent.

use mesh_ipc::api::ApiErrorBody;
use mesh_ipc::{IpcClient, routes};
use mesh_testkit::TestHome;

use super::*;

fn call(client: &IpcClient, method: &str, path: &str, body: Vec<u8>) -> (u16, ApiErrorBody) {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let method = hyper::Method::from_bytes(method.as_bytes()).expect("method");
    let (status, bytes) = rt.block_on(client.raw(method, path, body)).expect("daemon answers");
    let body = serde_json::from_slice(&bytes)
        .unwrap_or_else(|e| panic!("error body is not the documented JSON ({e}): {}", String::from_utf8_lossy(&bytes)));
    (status.as_u16(), body)
}

#[test]
fn malformed_oversized_and_misrouted_requests_get_json_errors() {
    let home = TestHome::new(MESH);
    home.ok(&["daemon", "up", "--no-embedded"]);
    let client = IpcClient::new(&home.paths());

    let (status, body) = call(&client, "POST", routes::SEND, b"{not json".to_vec());
    assert_eq!((status, body.error.code.http_status()), (400, 400));
    assert!(body.error.message.contains("invalid JSON"), "{}", body.error.message);

    let (status, body) = call(&client, "POST", routes::SEND, br#"{"to":"bob"}"#.to_vec());
    assert_eq!(status, 400);
    assert!(body.error.message.contains("missing field"), "{}", body.error.message);

    let huge = format!(r#"{{"client_message_id":"x","to":"bob","body":"{}"}}"#, "x".repeat(2 * 1024 * 1024));
    let (status, body) = call(&client, "POST", routes::SEND, huge.into_bytes());
    assert_eq!(status, 413, "{body:?}");

    let (status, body) = call(&client, "GET", "/v1/no-such-route", vec![]);
    assert_eq!(status, 404);
    assert!(body.error.message.contains("/v1/no-such-route"));

    let (status, _) = call(&client, "DELETE", routes::STATUS, vec![]);
    assert_eq!(status, 405);

    let (status, body) =
        call(&client, "POST", routes::SEND, br#"{"client_message_id":"x","to":"bob","body":""}"#.to_vec());
    assert_eq!(status, 400);
    assert!(body.error.message.contains("empty"));

    let (status, body) =
        call(&client, "POST", routes::SEND, br#"{"client_message_id":"x","to":"bob","body":"hi"}"#.to_vec());
    assert_eq!(status, 400, "{body:?}");
    assert_eq!(body.error.code, mesh_ipc::api::ApiErrorCode::UnknownTarget);

    // A client of another contract version, with a real HTTP client outside the project.
    let out = std::process::Command::new("curl")
        .args(["-s", "--unix-socket"])
        .arg(home.paths().socket_path())
        .args(["-H", "x-mesh-ipc: 99", "http://localhost/v1/version"])
        .output()
        .expect("curl");
    let body: ApiErrorBody = serde_json::from_slice(&out.stdout).expect("JSON error from curl");
    assert_eq!(body.error.code, mesh_ipc::api::ApiErrorCode::VersionMismatch);

    // After all that, the daemon is fine.
    home.ok(&["daemon", "status"]);
}

#[test]
fn a_resend_with_the_same_idempotency_key_is_answered_from_the_outbox() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "alice"]);
    home.ok(&["daemon", "up"]);
    let first = home.json(&["send", "alice", "once", "--idempotency-key", "k-1"]);
    assert_eq!(first["duplicate"], false);
    let again = home.json(&["send", "alice", "once", "--idempotency-key", "k-1"]);
    assert_eq!(again["duplicate"], true);
    assert_eq!(again["outbox_id"], first["outbox_id"]);
    let err = home.fails(&["send", "alice", "something else", "--idempotency-key", "k-1"], 1);
    assert!(err.contains("already used for a different message"), "{err}");
    wait_for_message(&home, "once");
    let outbox = home.json(&["outbox"]);
    assert_eq!(outbox.as_array().expect("array").len(), 1, "{outbox}");
}

/// A presented token that is not valid is refused on every route, whatever the route would do for
/// the member: nothing is served, minted or stopped on a garbage or a dead token.
#[test]
fn every_route_refuses_a_garbage_or_dead_token() {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "alice"]);
    home.ok(&["daemon", "up"]);
    let mut session = home.launch("worker", None);
    let dead = std::fs::read_to_string(&session.token_file).expect("token").trim().to_owned();
    session.kill();
    home.eventually_json("the session to end", &["session", "list"], |v| v[0]["live"] == false);
    let routes_to_try: [(&str, &str, &str); 23] = [
        ("GET", routes::VERSION, ""),
        ("GET", routes::STATUS, ""),
        ("GET", routes::MESHES, ""),
        ("GET", routes::PEERS, ""),
        ("GET", routes::CONTEXT, ""),
        ("GET", routes::SESSIONS, ""),
        ("GET", routes::SESSION, ""),
        ("GET", routes::INBOX, ""),
        ("GET", routes::OUTBOX, ""),
        ("GET", routes::GROUPS, ""),
        ("POST", routes::SHUTDOWN, "{}"),
        ("POST", routes::INVITES, "{}"),
        ("POST", routes::MESHES, r#"{"name":"x","broker":"ws://127.0.0.1:9"}"#),
        ("POST", routes::MESHES_JOIN, r#"{"token":"x"}"#),
        ("POST", routes::MESHES_RENAME, r#"{"name":"x"}"#),
        ("PUT", routes::CONTEXT, r#"{"mesh":null}"#),
        ("POST", routes::SESSIONS, r#"{"name":"y","pid":1}"#),
        ("POST", routes::SEND, r#"{"client_message_id":"c","to":"alice","body":"x"}"#),
        ("POST", routes::INBOX_ACK, r#"{"all":true}"#),
        ("POST", routes::GROUPS_JOIN, r#"{"group":"ops"}"#),
        ("GET", routes::MESHES_LIMITS, ""),
        ("POST", routes::MESHES_LIMITS, r#"{"connections":1}"#),
        ("POST", routes::NOTICES_CLAIM, r#"{"channel":"push"}"#),
    ];
    for token in ["not-a-token", dead.as_str()] {
        let client = IpcClient::new(&home.paths()).with_bearer(Some(token.to_owned()));
        for (method, route, body) in routes_to_try {
            let (status, err) = call(&client, method, route, body.as_bytes().to_vec());
            assert_eq!((status, err.error.code), (401, mesh_ipc::api::ApiErrorCode::Unauthorized), "{method} {route}");
        }
    }
    assert!(home.json(&["daemon", "status"])["pid"].is_u64(), "the daemon still runs");
    assert!(home.json(&["session", "list"]).as_array().expect("array").len() == 1, "no session was created");
}

/// Connections that never send a request cannot hold the daemon: each is closed when its headers do
/// not come within 10 s, and however many there are, the daemon answers again once they are.
#[test]
fn idle_connections_are_closed_and_never_stop_the_daemon_answering() {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    let home = TestHome::new(MESH);
    home.ok(&["daemon", "up", "--no-embedded"]);
    let socket = home.paths().socket_path();
    // More silent connections than the daemon serves at once.
    let silent: Vec<UnixStream> = (0..300).map(|_| UnixStream::connect(&socket).expect("connect")).collect();
    // A client behind them is answered once the silent ones are closed for want of headers.
    let out = home.run(&["daemon", "status", "--json"]);
    assert!(out.status.success(), "{}", home.report(&["daemon", "status"], &out));
    // Each silent connection was closed by the daemon (end of file), not left open.
    for mut s in silent.into_iter().take(5) {
        s.set_read_timeout(Some(std::time::Duration::from_secs(30))).expect("timeout");
        let mut buf = [0u8; 1];
        assert_eq!(s.read(&mut buf).expect("closed, not timed out"), 0);
    }
}
