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
