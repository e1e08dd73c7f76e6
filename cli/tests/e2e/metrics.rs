//! `GET /v1/metrics` read with curl and parsed by Python's `prometheus_client` after a known
//! workload: every figure matches it.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use mesh_testkit::{WAIT, eventually};

use super::*;

/// `(name{label=value,…}, value)` of every sample, as Python's `prometheus_client` parser reads it.
fn parse(python: &str, text: &str) -> BTreeMap<String, f64> {
    let script = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
out = {}
for family in text_string_to_metric_families(sys.stdin.read()):
    for s in family.samples:
        labels = ",".join(f"{k}={v}" for k, v in sorted(s.labels.items()))
        out[f"{s.name}{{{labels}}}"] = s.value
print(json.dumps(out))
"#;
    let mut child =
        Command::new(python).args(["-c", script]).stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("python");
    child.stdin.take().expect("stdin").write_all(text.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("parser");
    assert!(out.status.success(), "the parser refused the exposition:\n{text}");
    serde_json::from_slice(&out.stdout).expect("json")
}

#[test]
fn metrics_match_a_known_workload_and_need_the_members_token() {
    let Some(python) = super::python_with("prometheus_client", "prometheus_client") else { return };
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "solo"]);
    // Each webhook delivery is attempted once within the test: the first retry is an hour away.
    std::fs::write(home.paths().config_dir.join("daemon.json"), r#"{"webhooks": {"retry_schedule": ["1h"]}}"#)
        .expect("config");
    home.ok(&["daemon", "up"]);
    let session = home.launch("s", None);
    // Nothing listens on port 1: every attempt fails at once.
    session.ok(&["webhook", "add", "http://127.0.0.1:1/hook", "--events", "message"]);
    for i in 0..3 {
        home.ok(&["send", "s", &format!("m{i}")]);
    }
    let socket = home.paths().socket_path();
    let token = std::fs::read_to_string(home.paths().member_token_path()).expect("member token");
    let scrape = |auth: Option<&str>| {
        let mut c = Command::new("curl");
        c.args(["-s", "--max-time", "5", "-w", "\n%{http_code}", "--unix-socket"]).arg(&socket);
        if let Some(t) = auth {
            c.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        let out = c.arg("http://localhost/v1/metrics").output().expect("curl");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').expect("a status line");
        (code.to_owned(), body.to_owned())
    };
    let m = eventually("the workload settled", WAIT, || {
        let (code, body) = scrape(Some(token.trim()));
        assert_eq!(code, "200", "{body}");
        let m = parse(&python, &body);
        let settled = m.get("mesh_daemon_outbox{status=done}") == Some(&3.0)
            && m.get("mesh_daemon_webhook_deliveries{status=failing}") == Some(&3.0);
        settled.then_some(m)
    });
    let local = home.json(&["meshes"])[0]["name"].as_str().expect("mesh").to_owned();
    let expect = [
        ("mesh_daemon_outbox{status=pending}".to_owned(), 0.0),
        ("mesh_daemon_outbox{status=dead}".to_owned(), 0.0),
        ("mesh_daemon_inbox{state=unread}".to_owned(), 3.0),
        ("mesh_daemon_inbox{state=total}".to_owned(), 3.0),
        ("mesh_daemon_inbox{state=failed}".to_owned(), 0.0),
        ("mesh_daemon_sessions_live{}".to_owned(), 1.0),
        (format!("mesh_daemon_link{{mesh={local},state=online}}"), 1.0),
        (format!("mesh_daemon_link{{mesh={local},state=offline}}"), 0.0),
        ("mesh_daemon_webhook_endpoints{state=enabled}".to_owned(), 1.0),
        ("mesh_daemon_webhook_endpoints{state=disabled}".to_owned(), 0.0),
        ("mesh_daemon_webhook_deliveries{status=pending}".to_owned(), 3.0),
        ("mesh_daemon_webhook_deliveries{status=delivered}".to_owned(), 0.0),
        ("mesh_daemon_webhook_attempts_total{result=retry}".to_owned(), 3.0),
        ("mesh_daemon_webhook_attempts_total{result=delivered}".to_owned(), 0.0),
        (format!("mesh_daemon_build_info{{version={}}}", env!("CARGO_PKG_VERSION")), 1.0),
    ];
    for (name, value) in expect {
        assert_eq!(m.get(&name), Some(&value), "{name} in {m:#?}");
    }
    // Only with the member's token: none, or a session's, is refused. The scheme's case does not matter.
    let lower = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--unix-socket"])
        .arg(&socket)
        .args(["-H", &format!("authorization: bearer {}", token.trim()), "http://localhost/v1/metrics"])
        .output()
        .expect("curl");
    assert_eq!(String::from_utf8_lossy(&lower.stdout), "200");
    assert_eq!(scrape(None).0, "401");
    let session_token = std::fs::read_to_string(&session.token_file).expect("session token");
    assert_eq!(scrape(Some(session_token.trim())).0, "401");
}

/// A broker's `/metrics`, parsed.
fn scrape_broker(python: &str, url: &str) -> BTreeMap<String, f64> {
    let out = Command::new("curl").args(["-sf", "--max-time", "5", url]).output().expect("curl");
    assert!(out.status.success(), "GET {url} failed");
    parse(python, &String::from_utf8_lossy(&out.stdout))
}

fn value(m: &BTreeMap<String, f64>, name: &str) -> f64 {
    *m.get(name).unwrap_or_else(|| panic!("{name} missing in {m:#?}"))
}

#[test]
fn broker_metrics_count_a_known_workload_exactly() {
    let Some(python) = super::python_with("prometheus_client", "prometheus_client") else { return };
    let broker = mesh_testkit::BrokerProcess::start_with(MESH, &["--metrics-listen", "127.0.0.1:0"]);
    let url = broker.metrics.clone().expect("the broker says where its metrics are");
    let (alice, bob) = super::sessions::team(&broker);
    let mesh = alice.json(&["meshes"]).as_array().expect("meshes").iter().find(|m| m["name"] == "team").expect("team")
        ["id"]
        .as_str()
        .expect("id")
        .to_owned();
    let before = scrape_broker(&python, &url);
    for i in 0..5 {
        alice.ok(&["send", "--mesh", "team", "bob", &format!("counted {i}")]);
    }
    bob.eventually_json("five messages", &["inbox"], |v| ready_bodies(v).len() == 5);
    bob.ok(&["inbox", "ack", "--all"]);
    alice.eventually_json("five read receipts", &["outbox", "--mesh", "team"], |v| {
        v.as_array().is_some_and(|rows| rows.len() == 5 && rows.iter().all(|r| r["read_count"] == 1))
    });
    let depth = format!("mesh_broker_queue_depth{{mesh={mesh}}}");
    // Everything delivered and acked, receipts included: the queue is empty again.
    let after = eventually("the queue drained", WAIT, || {
        let m = scrape_broker(&python, &url);
        (m.get(&depth) == Some(&0.0)
            && value(&m, "mesh_broker_deliveries_total{}") == value(&m, "mesh_broker_acks_total{}"))
        .then_some(m)
    });
    let delta = |name: &str| value(&after, name) - before.get(name).copied().unwrap_or(0.0);
    assert_eq!(delta("mesh_broker_sends_total{result=accepted}"), 5.0);
    assert_eq!(delta("mesh_broker_receipts_total{kind=delivered}"), 5.0);
    assert_eq!(delta("mesh_broker_receipts_total{kind=read}"), 5.0);
    assert_eq!(delta("mesh_broker_receipts_total{kind=expired}"), 0.0);
    assert_eq!(delta("mesh_broker_handshakes_total{result=ok}"), 0.0, "no connection was made again");
    assert_eq!(delta("mesh_broker_redeliveries_total{}"), 0.0);
    assert_eq!(delta("mesh_broker_expired_total{}"), 0.0);
    // Five messages to bob, and the receipts to alice in however many items they were batched into.
    assert!(delta("mesh_broker_deliveries_total{}") >= 6.0, "{after:#?}");
    assert_eq!(delta("mesh_broker_deliveries_total{}"), delta("mesh_broker_acks_total{}"));
    assert_eq!(value(&after, "mesh_broker_connections{kind=member}"), 2.0);
    assert_eq!(value(&after, "mesh_broker_connections{kind=session}"), 0.0);
    assert_eq!(value(&after, &format!("mesh_broker_queue_oldest_age_seconds{{mesh={mesh}}}")), 0.0);
    assert!(value(&after, "mesh_broker_store_batch_size_count{}") > 0.0);
    assert!(value(&after, "mesh_broker_store_commit_seconds_count{}") > 0.0);
    assert_eq!(value(&after, &format!("mesh_broker_build_info{{version={}}}", env!("CARGO_PKG_VERSION"))), 1.0);
}
