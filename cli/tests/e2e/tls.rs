//! Brokers over TLS (`wss://`): self-signed and pinned, or signed by a certificate authority; the
//! pin carried by invites; refusals (wrong pin, expired, another host's certificate) with their
//! words; certificate reload on SIGHUP; kill -9 of a TLS broker mid-flow; a TLS client no one here
//! wrote (Python's `ssl` with `websockets`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use mesh_testkit::{BrokerProcess, TestHome};
use serde_json::Value;

use super::*;

/// A certificate authority of the test's own, trusted by a daemon through `SSL_CERT_FILE`.
struct TestCa {
    dir: tempfile::TempDir,
    issuer: rcgen::CertifiedIssuer<'static, rcgen::KeyPair>,
}

impl TestCa {
    fn new() -> TestCa {
        let mut params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, "mesh test CA");
        params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
        let issuer = rcgen::CertifiedIssuer::self_signed(params, rcgen::KeyPair::generate().expect("key")).expect("CA");
        let dir = tempfile::tempdir().expect("dir");
        std::fs::write(dir.path().join("ca.pem"), issuer.pem()).expect("writing the CA");
        TestCa { dir, issuer }
    }

    fn file(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `hosts` signed by this CA, expired or not: (certificate file, key file 0600).
    fn leaf(&self, name: &str, hosts: &[&str], expired: bool) -> (PathBuf, PathBuf) {
        let mut params =
            rcgen::CertificateParams::new(hosts.iter().map(|h| (*h).to_owned()).collect::<Vec<_>>()).expect("params");
        params.distinguished_name.push(rcgen::DnType::CommonName, hosts[0]);
        if expired {
            params.not_before = rcgen::date_time_ymd(2020, 1, 1);
            params.not_after = rcgen::date_time_ymd(2021, 1, 1);
        }
        let key = rcgen::KeyPair::generate().expect("key");
        let cert = params.signed_by(&key, &self.issuer).expect("signed");
        let (cert_file, key_file) =
            (self.dir.path().join(format!("{name}.pem")), self.dir.path().join(format!("{name}-key.pem")));
        std::fs::write(&cert_file, cert.pem()).expect("cert");
        write_key(&key_file, &key.serialize_pem());
        (cert_file, key_file)
    }
}

/// A private key file as an operator keeps one: 0600.
fn write_key(path: &Path, pem: &str) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(path, pem).expect("key");
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
}

fn self_signed_broker() -> BrokerProcess {
    BrokerProcess::start_with(MESH, &["--tls-self-signed", "localhost,127.0.0.1"])
}

fn pin_of(broker: &BrokerProcess) -> String {
    broker.tls_pin.clone().expect("a TLS broker prints its certificate's pin")
}

fn member(name: &str) -> TestHome {
    let home = TestHome::new(MESH);
    home.ok(&["init", "--name", name]);
    home.ok(&["daemon", "up", "--no-embedded"]);
    home
}

fn mesh_status(home: &TestHome, mesh: &str) -> Value {
    let status = home.json(&["daemon", "status"]);
    status["meshes"].as_array().expect("meshes").iter().find(|m| m["name"] == mesh).expect("mesh listed").clone()
}

/// Runs the Python TLS client against `url` with `trust` (`--pin P` or `--ca FILE`).
fn python_client(python: &str, url: &str, trust: &[&str]) -> std::process::Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/tls_client.py");
    std::process::Command::new(python).arg(script).arg(url).args(trust).output().expect("running the TLS client")
}

fn parsed(out: &std::process::Output) -> Value {
    assert!(
        out.status.success(),
        "TLS client failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("one JSON line")
}

#[test]
fn a_self_signed_broker_is_pinned_at_create_and_joiners_verify_it_from_the_invite_alone() {
    let mut broker = self_signed_broker();
    assert!(broker.url.starts_with("wss://"), "{}", broker.url);
    let pin = pin_of(&broker);
    let (alice, bob) = (member("alice"), member("bob"));

    // No authority vouches for it: no mesh, and the refusal names the certificate to check.
    let refused = alice.fails(&["create", "team", "--broker", &broker.url], 1);
    assert!(refused.contains("not signed by an authority this machine trusts"), "{refused}");
    assert!(refused.contains(&format!("--pin {pin}")), "{refused}");
    let refused = alice.fails(&["--json", "create", "team", "--broker", &broker.url], 1);
    let refused: Value = serde_json::from_str(refused.trim()).expect("a JSON error");
    assert_eq!(refused["error"]["code"], "certificate_untrusted");
    assert_eq!(refused["error"]["certificate"], pin.as_str(), "the certificate to check, for scripts");
    assert!(alice.json(&["meshes"]).as_array().expect("array").is_empty());

    alice.ok(&["create", "team", "--broker", &broker.url, "--pin", &pin]);
    let team = mesh_status(&alice, "team");
    assert_eq!(team["transport"], "tls_pinned");
    assert_eq!(team["tls_pin"], pin.as_str());
    let invite = alice.json(&["invite", "--mesh", "team", "--uses", "0"]);
    assert_eq!(invite["tls_pin"], pin.as_str(), "the invite carries the pin");
    bob.ok(&["join", invite["token"].as_str().expect("token")]);
    assert_eq!(mesh_status(&bob, "team")["transport"], "tls_pinned");
    wait_for_peer(&alice, "bob");

    // kill -9 of the broker in the middle of a flow over TLS: every message arrives, once.
    let sent: Vec<String> = (0..60).map(|i| format!("over tls {i}")).collect();
    for (i, body) in sent.iter().enumerate() {
        if i == 25 {
            broker.kill9();
            broker.start_again(MESH);
            assert_eq!(broker.tls_pin.as_deref(), Some(pin.as_str()), "the same certificate after a restart");
        }
        alice.ok(&["send", "bob", body, "--mesh", "team"]);
    }
    let inbox = bob.eventually_json("every message at bob", &["inbox", "--limit", "1000"], |v| {
        ready_bodies(v).len() >= sent.len()
    });
    let mut counts: HashMap<String, usize> = HashMap::new();
    for body in ready_bodies(&inbox) {
        *counts.entry(body).or_default() += 1;
    }
    for body in &sent {
        assert_eq!(counts.get(body), Some(&1), "{body:?}");
    }
    assert_eq!(counts.len(), sent.len());
}

#[test]
fn a_certificate_that_changed_stops_the_link_with_its_words_until_repinned() {
    let mut broker = self_signed_broker();
    let old = pin_of(&broker);
    let alice = member("alice");
    alice.ok(&["create", "team", "--broker", &broker.url, "--pin", &old]);
    alice.eventually_json("online", &["daemon", "status"], |s| s["meshes"][0]["connection"]["state"] == "online");

    // A wrong pin at create: nothing is created, the refusal says what the broker presents.
    let wrong = format!("sha256:{}", "ab".repeat(32));
    let refused = alice.fails(&["create", "other", "--broker", &broker.url, "--pin", &wrong], 1);
    assert!(refused.contains(&format!("presents {old}, not the pin given ({wrong})")), "{refused}");

    // The operator replaces the certificate and restarts: the link refuses it and says how to go on.
    let dir = broker.db.parent().expect("dir").to_owned();
    std::fs::remove_file(dir.join("broker-tls-cert.pem")).expect("rm cert");
    std::fs::remove_file(dir.join("broker-tls-key.pem")).expect("rm key");
    broker.restart(MESH);
    let new = pin_of(&broker);
    assert_ne!(new, old);
    let status = alice.eventually_json("the link refuses the new certificate", &["daemon", "status"], |s| {
        s["meshes"][0]["connection"]["state"] == "rejected"
    });
    let why = status["meshes"][0]["connection"]["last_error"].as_str().expect("why");
    assert_eq!(
        why,
        format!(
            "broker certificate changed: expected {old}, got {new}; if the operator rotated it, run `mesh repin --mesh team`"
        )
    );
    assert_eq!(status["meshes"][0]["connection"]["certificate"], new.as_str());
    // A session launched meanwhile says why it cannot connect, with the certificate.
    let refused = alice.fails(&["--json", "launch", "--name", "worker", "--mesh", "team", "--", "true"], 1);
    let refused: Value = serde_json::from_str(refused.trim()).expect("a JSON error");
    assert_eq!(refused["error"]["code"], "certificate_refused", "{refused}");
    assert_eq!(refused["error"]["certificate"], new.as_str());
    // No invite carries a pin the broker no longer passes.
    let refused = alice.fails(&["invite", "--mesh", "team"], 1);
    assert!(refused.contains("no invite: with the mesh's pin, its broker is refused"), "{refused}");
    let doctor = alice.run(&["doctor", "--json"]);
    assert_eq!(doctor.status.code(), Some(1));
    let doctor: Value = serde_json::from_slice(&doctor.stdout).expect("json");
    let check = doctor["checks"].as_array().expect("checks").iter().find(|c| c["name"] == "certificate (team)");
    let check = check.expect("a certificate check");
    assert_eq!(check["ok"], false);
    assert_eq!(check["detail"], format!("broker certificate changed: expected {old}, got {new}"));
    assert!(check["fix"].as_str().expect("fix").contains(&format!("mesh repin --mesh team --pin {new}")));

    // Shown, then repinned to exactly what the broker presents; a different pin changes nothing.
    let shown = alice.json(&["repin", "--mesh", "team"]);
    assert_eq!(shown["presented"], new.as_str());
    assert_eq!(shown["previous"], old.as_str());
    assert_eq!(shown["pinned"], false);
    let refused = alice.fails(&["repin", "--mesh", "team", "--pin", &wrong], 1);
    assert!(refused.contains(&format!("presents {new}, not {wrong}; nothing changed")), "{refused}");
    alice.ok(&["repin", "--mesh", "team", "--pin", &new]);
    alice.eventually_json("online with the new pin", &["daemon", "status"], |s| {
        s["meshes"][0]["connection"]["state"] == "online" && s["meshes"][0]["tls_pin"] == new.as_str()
    });
    let invite = alice.json(&["invite", "--mesh", "team"]);
    assert_eq!(invite["tls_pin"], new.as_str(), "invites made after carry the new pin");
    let doctor = alice.json(&["doctor"]);
    let check =
        doctor["checks"].as_array().expect("checks").iter().find(|c| c["name"] == "certificate (team)").cloned();
    assert_eq!(check.expect("a certificate check")["ok"], true);
}

#[test]
fn a_broker_signed_by_an_authority_is_verified_by_it_and_refused_when_expired_or_for_another_host() {
    let ca = TestCa::new();
    let (good, good_key) = ca.leaf("good", &["localhost"], false);
    let (expired, expired_key) = ca.leaf("expired", &["localhost"], true);
    let (elsewhere, elsewhere_key) = ca.leaf("elsewhere", &["broker.elsewhere.example"], false);
    let serve = |cert: &Path, key: &Path| {
        let (cert, key) = (cert.to_str().expect("utf-8"), key.to_str().expect("utf-8"));
        BrokerProcess::start_with(MESH, &["--tls-cert", cert, "--tls-key", key])
    };
    let alice = TestHome::new(MESH).with_env("SSL_CERT_FILE", ca.file());
    alice.ok(&["init", "--name", "alice"]);
    alice.ok(&["daemon", "up", "--no-embedded"]);

    let broker = serve(&good, &good_key);
    let url = format!("wss://localhost:{}", broker.port);
    alice.ok(&["create", "team", "--broker", &url]);
    let team = mesh_status(&alice, "team");
    assert_eq!(team["transport"], "tls", "verified by the authority, no pin");
    assert!(team.get("tls_pin").is_none_or(Value::is_null));
    alice.eventually_json("online", &["daemon", "status"], |s| s["meshes"][0]["connection"]["state"] == "online");

    let broker = serve(&expired, &expired_key);
    let refused = alice.fails(&["create", "old", "--broker", &format!("wss://localhost:{}", broker.port)], 1);
    assert!(refused.contains("has expired"), "{refused}");

    let broker = serve(&elsewhere, &elsewhere_key);
    let refused = alice.fails(&["create", "away", "--broker", &format!("wss://localhost:{}", broker.port)], 1);
    assert!(refused.contains("is not for localhost"), "{refused}");

    // A daemon that does not trust the test CA refuses the good one as unknown.
    let bob = member("bob");
    let broker = serve(&good, &good_key);
    let refused = bob.fails(&["create", "team", "--broker", &format!("wss://localhost:{}", broker.port)], 1);
    assert!(refused.contains("not signed by an authority this machine trusts"), "{refused}");
}

#[test]
fn plain_ws_to_another_machine_needs_insecure_and_is_shown_as_unencrypted() {
    let alice = member("alice");
    // 192.0.2.0/24 is for documentation: nothing answers, which is all this needs.
    let refused = alice.fails(&["create", "far", "--broker", "ws://192.0.2.1:7777"], 1);
    assert!(refused.contains("plain ws:// to another machine"), "{refused}");
    assert!(refused.contains("--insecure"), "{refused}");
    let broker = BrokerProcess::start(MESH);
    // Loopback stays plain without a word.
    alice.ok(&["create", "near", "--broker", &broker.url]);
    assert_eq!(mesh_status(&alice, "near")["transport"], "loopback");
    let pinned_plain =
        alice.fails(&["create", "odd", "--broker", &broker.url, "--pin", &format!("sha256:{}", "0".repeat(64))], 1);
    assert!(pinned_plain.contains("a pin is for a wss:// broker"), "{pinned_plain}");
    // The wrong scheme for a broker is said as such, both ways.
    let tls_to_plain = alice.fails(&["create", "odd", "--broker", &broker.url.replacen("ws://", "wss://", 1)], 1);
    assert!(tls_to_plain.contains("does it speak TLS? a plain broker is ws://"), "{tls_to_plain}");
    let tls_broker = self_signed_broker();
    let plain_to_tls = alice.fails(&["create", "odd", "--broker", &tls_broker.url.replacen("wss://", "ws://", 1)], 1);
    assert!(plain_to_tls.contains("then its address is wss://"), "{plain_to_tls}");
    assert!(alice.json(&["meshes"]).as_array().expect("array").iter().all(|m| m["name"] != "odd"));
}

#[test]
fn a_python_tls_client_reaches_the_broker_by_pin_and_by_authority() {
    let Some(python) = python_with("websockets", "websockets") else { return };
    let broker = self_signed_broker();
    let pin = pin_of(&broker);
    let seen = parsed(&python_client(&python, &broker.url, &["--pin", &pin]));
    assert_eq!(seen["fingerprint"], pin.as_str());
    assert_eq!(seen["first_frame"], "challenge");
    assert_eq!(seen["health"], "ok", "/health on the same TLS port");
    let wrong = format!("sha256:{}", "cd".repeat(32));
    assert!(!python_client(&python, &broker.url, &["--pin", &wrong]).status.success());

    let ca = TestCa::new();
    let (cert, key) = ca.leaf("good", &["localhost"], false);
    let broker = BrokerProcess::start_with(
        MESH,
        &["--tls-cert", cert.to_str().expect("utf-8"), "--tls-key", key.to_str().expect("utf-8")],
    );
    let url = format!("wss://localhost:{}", broker.port);
    let ca_file = ca.file();
    let seen = parsed(&python_client(&python, &url, &["--ca", ca_file.to_str().expect("utf-8")]));
    assert_eq!(seen["first_frame"], "challenge");
    // Python's own verification refuses the self-signed one.
    let other = self_signed_broker();
    let url = format!("wss://localhost:{}", other.port);
    assert!(!python_client(&python, &url, &["--ca", ca_file.to_str().expect("utf-8")]).status.success());
}

#[test]
fn sighup_reloads_the_certificate_for_new_connections_and_keeps_the_ones_up() {
    let Some(python) = python_with("websockets", "websockets") else { return };
    let broker = self_signed_broker();
    let old = pin_of(&broker);
    let (alice, bob) = (member("alice"), member("bob"));
    alice.ok(&["create", "team", "--broker", &broker.url, "--pin", &old]);
    let token = alice.ok(&["invite", "--mesh", "team"]).trim().to_owned();
    bob.ok(&["join", &token]);
    wait_for_peer(&alice, "bob");
    let since = alice.eventually_json("online", &["daemon", "status"], |s| {
        s["meshes"][0]["connection"]["state"] == "online"
    })["meshes"][0]["connection"]["since"]
        .clone();

    // The operator puts a new pair in place (another broker's) and sends SIGHUP.
    let other = self_signed_broker();
    let new = pin_of(&other);
    let (from, to) = (other.db.parent().expect("dir"), broker.db.parent().expect("dir"));
    for file in ["broker-tls-key.pem", "broker-tls-cert.pem"] {
        std::fs::copy(from.join(file), to.join(file)).expect("copy");
    }
    broker.signal(nix::sys::signal::Signal::SIGHUP);
    mesh_testkit::eventually("new connections see the new certificate", mesh_testkit::WAIT, || {
        let out = python_client(&python, &broker.url, &["--pin", &new]);
        out.status.success().then_some(())
    });

    // The connections made before are the same ones, and carry messages.
    alice.ok(&["send", "bob", "after the reload", "--mesh", "team"]);
    wait_for_message(&bob, "after the reload");
    let status = alice.json(&["daemon", "status"]);
    assert_eq!(status["meshes"][0]["connection"]["state"], "online");
    assert_eq!(status["meshes"][0]["connection"]["since"], since, "the link did not reconnect");
}

#[test]
fn any_certificate_can_be_pinned_and_a_pin_that_cannot_work_is_never_kept() {
    let ca = TestCa::new();
    let bob = member("bob"); // trusts no test authority
    let serve = |cert: &Path, key: &Path| {
        let (cert, key) = (cert.to_str().expect("utf-8"), key.to_str().expect("utf-8"));
        BrokerProcess::start_with(MESH, &["--tls-cert", cert, "--tls-key", key])
    };
    let pin_of_file =
        |cert: &Path, key: &Path| mesh_broker::tls::ServerTls::from_files(cert, key).expect("a pair").pin().to_string();

    // A leaf issued by an authority this machine does not know, pinned.
    let (issued, issued_key) = ca.leaf("issued", &["localhost"], false);
    let broker = serve(&issued, &issued_key);
    bob.ok(&["create", "issued", "--broker", &broker.url, "--pin", &pin_of_file(&issued, &issued_key)]);
    bob.eventually_json("online", &["daemon", "status"], |s| s["meshes"][0]["connection"]["state"] == "online");

    // A self-signed certificate marked as an authority (what `openssl req -x509` makes), pinned.
    let mut params = rcgen::CertificateParams::new(vec!["localhost".to_owned()]).expect("params");
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = params.self_signed(&key).expect("cert");
    let dir = tempfile::tempdir().expect("dir");
    let (ca_like, ca_like_key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
    std::fs::write(&ca_like, cert.pem()).expect("cert");
    write_key(&ca_like_key, &key.serialize_pem());
    let other = serve(&ca_like, &ca_like_key);
    // Without a pin it is one no authority vouches for, to check and pin, like any self-signed one.
    let refused = bob.fails(&["--json", "create", "selfca", "--broker", &other.url], 1);
    let refused: Value = serde_json::from_str(refused.trim()).expect("a JSON error");
    assert_eq!(refused["error"]["code"], "certificate_untrusted", "{refused}");
    assert_eq!(refused["error"]["certificate"], pin_of_file(&ca_like, &ca_like_key).as_str());
    bob.ok(&["create", "selfca", "--broker", &other.url, "--pin", &pin_of_file(&ca_like, &ca_like_key)]);

    // The operator of the first broker moves to an expired certificate: repin to it is refused with
    // the reason, and the mesh keeps its working pin.
    drop(broker);
    let (expired, expired_key) = ca.leaf("expired", &["localhost"], true);
    let url = bob.json(&["meshes"])[0]["broker"].as_str().expect("url").to_owned();
    let port: u16 = url.rsplit(':').next().and_then(|p| p.parse().ok()).expect("port");
    let db = tempfile::tempdir().expect("db");
    let expired_args: Vec<String> =
        ["--tls-cert", expired.to_str().expect("utf-8"), "--tls-key", expired_key.to_str().expect("utf-8")]
            .map(str::to_owned)
            .to_vec();
    let _expired_broker = BrokerProcess::spawn(MESH, &db.path().join("b.db"), port, &expired_args);
    let refused = bob.fails(&["repin", "--mesh", "issued", "--pin", &pin_of_file(&expired, &expired_key)], 1);
    assert!(refused.contains("has expired; nothing changed"), "{refused}");
    assert_eq!(mesh_status(&bob, "issued")["tls_pin"], pin_of_file(&issued, &issued_key).as_str());
    // Without authorities vouching for it, a pin cannot be dropped either.
    let refused = bob.fails(&["repin", "--mesh", "selfca", "--unpin"], 1);
    assert!(refused.contains("without its pin the broker would be refused"), "{refused}");
    assert_eq!(mesh_status(&bob, "selfca")["transport"], "tls_pinned");
}

#[test]
fn a_pin_is_dropped_for_authorities_once_they_vouch_for_the_broker() {
    let ca = TestCa::new();
    let (cert, key) = ca.leaf("good", &["localhost"], false);
    let broker = BrokerProcess::start_with(
        MESH,
        &["--tls-cert", cert.to_str().expect("utf-8"), "--tls-key", key.to_str().expect("utf-8")],
    );
    let alice = TestHome::new(MESH).with_env("SSL_CERT_FILE", ca.file());
    alice.ok(&["init", "--name", "alice"]);
    alice.ok(&["daemon", "up", "--no-embedded"]);
    let url = format!("wss://localhost:{}", broker.port);
    alice.ok(&["create", "team", "--broker", &url]);
    // Nothing to do while an authority vouches and there is no pin: no question, no failure. Then
    // pinned for a while, until the authority vouches again and the pin goes.
    let said = alice.run(&["repin", "--mesh", "team"]);
    assert!(said.status.success(), "{}", alice.report(&["repin", "--mesh", "team"], &said));
    let shown = alice.json(&["repin", "--mesh", "team"]);
    assert_eq!(shown["trusted_by_platform"], true);
    alice.ok(&["repin", "--mesh", "team", "--pin", shown["presented"].as_str().expect("pin")]);
    assert_eq!(mesh_status(&alice, "team")["transport"], "tls_pinned");
    alice.ok(&["repin", "--mesh", "team", "--unpin"]);
    let team = mesh_status(&alice, "team");
    assert_eq!(team["transport"], "tls");
    assert!(team.get("tls_pin").is_none_or(Value::is_null));
    let invite = alice.json(&["invite", "--mesh", "team"]);
    assert!(invite.get("tls_pin").is_none_or(Value::is_null), "invites carry no pin now");
}

#[test]
fn sighup_never_stops_a_broker_even_without_tls() {
    let mut broker = BrokerProcess::start(MESH);
    broker.signal(nix::sys::signal::Signal::SIGHUP);
    let alice = member("alice");
    alice.ok(&["create", "team", "--broker", &broker.url]);
    assert!(broker.running(), "a renewal hook signalling every broker must not end a plain one");
}
