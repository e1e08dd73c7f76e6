//! `mesh mcp` driven by the Python MCP SDK, as an agent's client: tools, typed errors, pushes that
//! reach only their own session, once each, across restarts.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};

use mesh_testkit::BrokerProcess;
use serde_json::{Value, json};

use super::sessions::team;
use super::*;

/// The Python with the MCP SDK, or `None` (the test says it is skipped) outside CI.
fn python_with_mcp() -> Option<String> {
    super::python_with("mcp, mcp_types", "mcp")
}

/// A Python MCP client running `mesh mcp ARGS` for `home` (see `mcp_driver.py`).
struct Driver {
    child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pidfile: PathBuf,
    _dir: tempfile::TempDir,
}

impl Driver {
    fn start(python: &str, home: &TestHome, args: &[&str]) -> Driver {
        Self::start_with(python, home, args, None)
    }

    /// The same, the server acting as the session whose token file is `session` (`mesh launch`'s).
    fn start_with(python: &str, home: &TestHome, args: &[&str], session: Option<&std::path::Path>) -> Driver {
        let dir = tempfile::tempdir().expect("tempdir");
        let pidfile = dir.path().join("server.pid");
        let mesh = home.cmd(&[]);
        let mut cmd = Command::new(python);
        cmd.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/e2e/mcp_driver.py"))
            .arg(&pidfile)
            .arg("--")
            .arg(mesh.get_program())
            .arg("mcp")
            .args(args)
            .current_dir(dir.path())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        for (k, v) in mesh.get_envs() {
            match v {
                Some(v) => cmd.env(k, v),
                None => cmd.env_remove(k),
            };
        }
        if let Some(file) = session {
            cmd.env("MESH_SESSION_FILE", file);
        }
        let mut child = cmd.spawn().expect("python MCP driver");
        let stdin = child.stdin.take().expect("stdin");
        let stdout = BufReader::new(child.stdout.take().expect("stdout"));
        let mut d = Driver { child, stdin, stdout, pidfile, _dir: dir };
        let ready = d.line();
        assert_eq!(ready["ready"], true, "the server started: {ready}");
        d
    }

    fn line(&mut self) -> Value {
        let mut line = String::new();
        self.stdout.read_line(&mut line).expect("driver output");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("driver said {line:?}: {e}"))
    }

    fn request(&mut self, req: Value) -> Value {
        writeln!(self.stdin, "{req}").expect("driver input");
        self.line()
    }

    fn call(&mut self, tool: &str, args: Value) -> Value {
        self.request(json!({"op": "call", "tool": tool, "args": args}))
    }

    /// The structured result of a call that must succeed.
    fn ok(&mut self, tool: &str, args: Value) -> Value {
        let r = self.call(tool, args.clone());
        assert_eq!(r["isError"], false, "{tool} {args}: {r}");
        r["structured"].clone()
    }

    /// Every channel notification so far, once there are at least `count` (or after `timeout` s).
    fn notes(&mut self, count: usize, timeout: u64) -> Vec<Value> {
        let r = self.request(json!({"op": "notes", "count": count, "timeout": timeout}));
        r["notes"].as_array().expect("notes").clone()
    }

    fn server_pid(&self) -> i32 {
        std::fs::read_to_string(&self.pidfile).expect("pid file").trim().parse().expect("pid")
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = writeln!(self.stdin, "{}", json!({"op": "quit"}));
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The inbox ids a set of notifications announced, summaries included.
fn announced(notes: &[Value]) -> Vec<i64> {
    let mut ids = Vec::new();
    for n in notes {
        let meta = &n["meta"];
        if meta["kind"] == "summary" {
            ids.extend(meta["message_ids"].as_str().expect("ids").split(',').map(|s| s.parse::<i64>().expect("id")));
        } else {
            ids.push(meta["message_id"].as_str().expect("message_id").parse().expect("id"));
        }
    }
    ids
}

#[test]
fn an_agent_uses_every_tool_and_gets_typed_errors() {
    let Some(python) = python_with_mcp() else { return };
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    let mut agent = Driver::start(&python, &bob, &["--name", "worker"]);
    wait_for_peer(&alice, "worker");

    let tools = agent.request(json!({"op": "tools"}));
    let mut names: Vec<&str> =
        tools["tools"].as_array().expect("tools").iter().map(|t| t["name"].as_str().expect("name")).collect();
    names.sort_unstable();
    assert_eq!(names, ["inbox", "peers", "read", "send", "status", "wait"]);
    let send_schema =
        &tools["tools"].as_array().expect("tools").iter().find(|t| t["name"] == "send").expect("send")["inputSchema"];
    assert_eq!(send_schema["required"], json!(["body"]), "{send_schema}");

    // It is the session `worker`, never the member.
    let status = agent.ok("status", json!({}));
    assert_eq!((&status["me"], &status["acting_as"]), (&json!("worker"), &json!("session")), "{status}");
    let peers = agent.ok("peers", json!({}));
    assert!(peers["peers"].as_array().expect("peers").iter().any(|p| p["name"] == "alice"), "{peers}");

    // A send reaches alice from the session; her reply comes back as a push.
    let sent = agent.ok("send", json!({"to": "alice", "body": "hello from the agent", "wait": "delivered"}));
    assert_eq!((&sent["reached"], &sent["delivered"]), (&json!(true), &json!(1)), "{sent}");
    let got = wait_for_message(&alice, "hello from the agent");
    assert_eq!(got["from_name"], "worker");
    alice.ok(&["send", "worker", "hello agent"]);
    let notes = agent.notes(1, 20);
    assert_eq!(notes.len(), 1, "{notes:?}");
    let (content, meta) = (&notes[0]["content"], &notes[0]["meta"]);
    assert_eq!(
        (content, &meta["from_name"], &meta["kind"]),
        (&json!("hello agent"), &json!("alice"), &json!("direct"))
    );
    assert!(meta.as_object().expect("meta").values().all(Value::is_string), "every meta value a string: {meta}");
    let id: i64 = meta["message_id"].as_str().expect("id").parse().expect("id");

    // Listing and pushing never mark read; `read` does, and alice hears of it.
    let inbox = agent.ok("inbox", json!({}));
    assert_eq!(inbox["messages"][0]["id"], id, "{inbox}");
    assert_eq!(inbox["messages"][0]["read"], false);
    let read = agent.ok("read", json!({"ids": [id]}));
    assert_eq!(read["read"][0]["body"], "hello agent", "{read}");
    alice.eventually_json("alice's send read", &["outbox"], |v| {
        v.as_array().expect("rows").iter().any(|r| r["body"] == "hello agent" && r["read_count"] == 1)
    });
    // A reply goes to the sender of the message replied to.
    agent.ok("send", json!({"reply_to": id, "body": "replying"}));
    wait_for_message(&alice, "replying");

    // A client that follows the inbox resource hears that it changed.
    assert_eq!(agent.request(json!({"op": "subscribe"}))["ok"], true);
    let before = agent.request(json!({"op": "updates"}))["updates"].as_u64().expect("count");
    // `wait` returns when a message arrives.
    alice.ok(&["send", "worker", "worth waiting for"]);
    let waited = agent.ok("wait", json!({"timeout_secs": 30}));
    assert!(
        waited["messages"].as_array().expect("messages").iter().any(|m| m["body"] == "worth waiting for"),
        "{waited}"
    );
    agent.notes(2, 20);
    let updated = |a: &mut Driver| a.request(json!({"op": "updates"}))["updates"].as_u64().expect("count");
    let end = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while updated(&mut agent) <= before && std::time::Instant::now() < end {
        agent.notes(2, 1);
    }
    assert!(updated(&mut agent) > before, "resources/updated for mesh://inbox");

    // Typed errors, as the CLI's.
    for (args, code) in [
        (json!({"to": "nobody-here", "body": "x"}), "unknown_target"),
        (json!({"to": "alice", "body": "x".repeat(70 * 1024)}), "payload_too_large"),
        (json!({"body": "to no one"}), "bad_request"),
        (json!({"to": "alice"}), "invalid_arguments"),
        (json!({"to": "alice", "body": "x", "wait": "never"}), "invalid_arguments"),
        (json!({"to": "alice", "body": "x", "timeout_secs": 0}), "bad_request"),
        (json!({"to": "alice", "reply_to": 1, "body": "x"}), "bad_request"),
        (json!({"reply_to": 999_999, "body": "x"}), "not_found"),
    ] {
        let r = agent.call("send", args.clone());
        assert_eq!((&r["isError"], &r["structured"]["code"]), (&json!(true), &json!(code)), "{args}: {r}");
    }
    let r = agent.call("inbox", json!({"limit": "abc"}));
    assert_eq!(r["structured"]["code"], "invalid_arguments", "{r}");
}

#[test]
fn each_server_pushes_only_its_own_session_s_messages() {
    let Some(python) = python_with_mcp() else { return };
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    // Two sessions of bob's, `one` in @ops; a server for each, inside its session.
    let (s1, s2) = (bob.launch("one", None), bob.launch("two", None));
    s1.ok(&["group", "join", "ops"]);
    let mut one = Driver::start_with(&python, &bob, &[], Some(&s1.token_file));
    let mut two = Driver::start_with(&python, &bob, &[], Some(&s2.token_file));
    wait_for_peer(&alice, "one");
    wait_for_peer(&alice, "two");
    alice.eventually_json("one in @ops", &["peers"], |v| {
        v.as_array().expect("peers").iter().any(|p| p["name"] == "one" && p["groups"].to_string().contains("ops"))
    });
    alice.ok(&["send", "one", "for one only"]);
    alice.ok(&["send", "two", "for two only"]);
    alice.ok(&["send", "@ops", "for ops"]);
    alice.ok(&["send", "*", "for everyone"]);
    let (a, b) = (one.notes(3, 20), two.notes(2, 20));
    let bodies = |n: &[Value]| {
        let mut v: Vec<String> = n.iter().map(|x| x["content"].as_str().expect("content").to_owned()).collect();
        v.sort();
        v
    };
    assert_eq!(bodies(&a), ["for everyone", "for one only", "for ops"], "{a:?}");
    // Two hears nothing more: a message for it after the others arrives alone.
    alice.ok(&["send", "two", "last"]);
    let b = two.notes(b.len() + 1, 20);
    assert_eq!(bodies(&b), ["for everyone", "for two only", "last"], "{b:?}");
    // And each lists only its own.
    let listed = one.ok("inbox", json!({"unread_only": false}));
    let mine: Vec<&str> =
        listed["messages"].as_array().expect("messages").iter().map(|m| m["body"].as_str().expect("body")).collect();
    assert!(!mine.contains(&"for two only") && !mine.contains(&"last"), "{listed}");
    // The member's own inbox is not the sessions'.
    let member = bob.json(&["inbox"]);
    assert!(ready_bodies(&member).iter().all(|b| b != "for one only" && b != "for two only"), "{member}");
}

#[test]
fn a_dead_session_s_server_answers_with_a_typed_error() {
    let Some(python) = python_with_mcp() else { return };
    let broker = BrokerProcess::start(MESH);
    let (_alice, bob) = team(&broker);
    let mut session = bob.launch("short-lived", None);
    let mut agent = Driver::start_with(&python, &bob, &[], Some(&session.token_file));
    agent.ok("status", json!({}));
    session.kill();
    bob.eventually_json("the session ended", &["session", "list"], |v| {
        v.as_array().expect("rows").iter().any(|s| s["name"] == "short-lived" && s["live"] == false)
    });
    let r = agent.call("inbox", json!({}));
    assert_eq!((&r["isError"], &r["structured"]["code"]), (&json!(true), &json!("unauthorized")), "{r}");
}

#[test]
fn every_message_is_announced_once_across_restarts_of_the_server_and_the_daemon() {
    let Some(python) = python_with_mcp() else { return };
    let broker = BrokerProcess::start(MESH);
    let (alice, bob) = team(&broker);
    let mut seen: Vec<i64> = Vec::new();

    // A launched session stays live while its MCP server is down, so what is sent meanwhile reaches
    // bob's daemon and waits there.
    let session = bob.launch("worker", None);
    let mut agent = Driver::start_with(&python, &bob, &[], Some(&session.token_file));
    wait_for_peer(&alice, "worker");
    alice.ok(&["send", "worker", "before the kill"]);
    seen.extend(announced(&agent.notes(1, 20)));

    // The server is killed; messages arrive while none runs.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(agent.server_pid()), nix::sys::signal::Signal::SIGKILL)
        .expect("kill -9 the server");
    drop(agent);
    let sent: Vec<String> = (0..100).map(|i| format!("while down {i}")).collect();
    for body in &sent {
        alice.ok(&["send", "worker", body]);
    }
    // All of them wait in bob's daemon before a server starts again.
    alice.eventually_json("bob's daemon has them all", &["outbox", "--limit", "1000"], |v| {
        v.as_array().is_some_and(|rows| {
            rows.iter()
                .filter(|r| r["body"].as_str().is_some_and(|b| b.starts_with("while down")))
                .filter(|r| r["delivered_count"] == 1)
                .count()
                == sent.len()
        })
    });
    let mut agent = Driver::start_with(&python, &bob, &[], Some(&session.token_file));
    let notes = agent.notes(1, 20);
    assert_eq!(notes[0]["meta"]["kind"], "summary", "what waited comes as one summary first: {notes:?}");
    // Some may have reached the daemon only after the summary: those come one by one.
    let mut notes = notes;
    while announced(&notes).len() < sent.len() {
        let more = agent.notes(notes.len() + 1, 20);
        assert!(more.len() > notes.len(), "announcements stopped short: {more:?}");
        notes = more;
    }
    seen.extend(announced(&notes));
    let total = 1 + sent.len();

    // The daemon is killed and comes back: nothing is announced again.
    bob.kill9_daemon();
    bob.ok(&["daemon", "up", "--no-embedded"]);
    alice.ok(&["send", "worker", "after the daemon came back"]);
    let after = agent.notes(notes.len() + 1, 30);
    seen.extend(announced(&after[notes.len()..]));

    let mut unique = seen.clone();
    unique.sort_unstable();
    unique.dedup();
    assert_eq!(seen.len(), unique.len(), "announced twice: {seen:?}");
    assert_eq!(unique.len(), total + 1, "every message announced: {seen:?}");
    // Announcing marked nothing read.
    let inbox = agent.ok("inbox", json!({"limit": 200}));
    assert_eq!(inbox["messages"].as_array().expect("messages").len(), total + 1, "all still unread");
}

/// Requests that do not parse are answered (JSON-RPC parse errors, with their id when it can be
/// read), never left hanging, and the server goes on serving.
#[test]
fn a_request_that_does_not_parse_is_answered_and_the_server_goes_on() {
    use std::io::BufRead;
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", "alice"]);
    home.ok(&["daemon", "up"]);
    let mut server = home
        .cmd(&["mcp", "--as-member"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("mesh mcp");
    let mut stdin = server.stdin.take().expect("stdin");
    let mut out = std::io::BufReader::new(server.stdout.take().expect("stdout"));
    let mut next = || {
        let mut line = String::new();
        out.read_line(&mut line).expect("a line");
        serde_json::from_str::<Value>(&line).unwrap_or_else(|e| panic!("not JSON-RPC: {line:?}: {e}"))
    };
    // A lone surrogate, bytes that are not UTF-8, JSON cut short.
    stdin
        .write_all(b"{\"jsonrpc\":\"2.0\",\"id\":7,\"method\":\"ping\",\"params\":{\"a\":\"\\ud800 x\"}}\n")
        .expect("write");
    let answer = next();
    assert_eq!((&answer["id"], &answer["error"]["code"]), (&json!(7), &json!(-32700)), "{answer}");
    stdin.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":8,\"method\":\"\xff\xfe\"}\n").expect("write");
    assert_eq!(next()["id"], 8);
    stdin.write_all(b"{\"jsonrpc\":\"2.0\",\"id\":9,\n").expect("write");
    assert_eq!(next()["error"]["code"], -32700);
    // And it still serves.
    let init = json!({"jsonrpc": "2.0", "id": 10, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    stdin.write_all(format!("{init}\n").as_bytes()).expect("write");
    let answer = next();
    assert_eq!(answer["id"], 10, "{answer}");
    assert!(answer["result"]["serverInfo"]["name"] == "mesh", "{answer}");
    drop(stdin);
    let _ = server.wait();
}
