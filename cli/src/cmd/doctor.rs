//! `mesh doctor`: what to check when something is wrong, each check with the fix to try.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use mesh_ipc::api::{LinkState, SessionInfo, Status, VersionInfo};
use mesh_ipc::{Home, routes};
use serde::Serialize;

use crate::output;

/// Less free space than this in the data directory is a failure.
const MIN_FREE_BYTES: u64 = 100 * 1024 * 1024;
/// A broker clock further off than this makes signed times (invites, attestations) fail.
const MAX_SKEW_MS: i64 = 30_000;
/// How long a daemon may take to answer before it counts as not answering.
const ANSWER_WITHIN: std::time::Duration = std::time::Duration::from_secs(5);

/// One IPC request, given at most [`ANSWER_WITHIN`].
fn ask<T>(f: impl std::future::Future<Output = Result<T, mesh_ipc::IpcError>>) -> anyhow::Result<Result<T, String>> {
    super::block_on(async {
        match tokio::time::timeout(ANSWER_WITHIN, f).await {
            Ok(r) => r.map_err(|e| e.to_string()),
            Err(_) => Err(format!("no answer within {} s", ANSWER_WITHIN.as_secs())),
        }
    })
}

#[derive(Debug, Serialize)]
struct Check {
    name: String,
    ok: bool,
    detail: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    fix: Option<String>,
}

fn pass(name: impl Into<String>, detail: impl Into<String>) -> Check {
    Check { name: name.into(), ok: true, detail: detail.into(), fix: None }
}

fn fail(name: impl Into<String>, detail: impl Into<String>, fix: impl Into<String>) -> Check {
    Check { name: name.into(), ok: false, detail: detail.into(), fix: Some(fix.into()) }
}

pub fn run() -> anyhow::Result<()> {
    let home = super::home()?;
    let mut checks = vec![files(&home), disk(&home), service()];
    let client = mesh_ipc::IpcClient::new(&home);
    match ask(client.get::<VersionInfo>(routes::VERSION))? {
        Ok(v) if v.version == env!("CARGO_PKG_VERSION") => {
            checks.insert(0, pass("daemon", format!("running (pid {}, version {})", v.pid, v.version)));
            if let Err(why) = daemon_checks(&client, &mut checks)? {
                checks[0] = fail(
                    "daemon",
                    format!("running (pid {}) but {why}", v.pid),
                    "mesh daemon down (it stops a daemon that does not answer by its pid), then mesh daemon up",
                );
            }
        }
        Ok(v) => checks.insert(
            0,
            fail(
                "daemon",
                format!("running version {}, but this mesh is {}", v.version, env!("CARGO_PKG_VERSION")),
                "restart it with this version: mesh daemon down && mesh daemon up",
            ),
        ),
        Err(e) => checks.insert(
            0,
            fail(
                "daemon",
                format!("not reachable: {e} (the checks that ask it were skipped)"),
                "mesh daemon up, or mesh daemon down first if it runs but does not answer; then mesh doctor again",
            ),
        ),
    }
    let failed = checks.iter().filter(|c| !c.ok).count();
    if output::json() {
        super::print_json(&serde_json::json!({ "ok": failed == 0, "checks": checks }))?;
    } else {
        for c in &checks {
            let mark = if c.ok { "✔" } else { "✘" };
            outln!("{}", output::clean(&format!("{mark} {}: {}", c.name, c.detail)));
            if let Some(fix) = &c.fix {
                outln!("{}", output::clean(&format!("    fix: {fix}")));
            }
        }
    }
    if failed > 0 {
        return Err(output::fail(
            "checks_failed",
            format!("{failed} of {} checks failed", checks.len()),
            Some("try the fixes above, then mesh doctor again".to_owned()),
        ));
    }
    Ok(())
}

/// Directories 0700, and the identity, token, databases and socket 0600.
fn files(home: &Home) -> Check {
    let mut loose = Vec::new();
    let mut fixes = Vec::new();
    let dirs = [&home.config_dir, &home.data_dir, &home.run_dir, &home.log_dir];
    for dir in dirs {
        if let Some(m) = mode(dir).filter(|m| m & 0o077 != 0) {
            loose.push(format!("{} is {m:o}", dir.display()));
            fixes.push(format!("chmod 700 '{}'", dir.display()));
        }
    }
    let with_sides = |db: std::path::PathBuf| {
        let side = |suffix: &str| std::path::PathBuf::from(format!("{}{suffix}", db.display()));
        [side("-wal"), side("-shm"), db]
    };
    let files: Vec<std::path::PathBuf> = [home.identity_path(), home.member_token_path(), home.socket_path()]
        .into_iter()
        .chain(with_sides(home.daemon_db()))
        .chain(with_sides(home.embedded_broker_db()))
        .collect();
    for file in &files {
        if let Some(m) = mode(file).filter(|m| m & 0o077 != 0) {
            loose.push(format!("{} is {m:o}", file.display()));
            fixes.push(format!("chmod 600 '{}'", file.display()));
        }
    }
    if loose.is_empty() {
        pass("files", "directories 0700; identity, token, databases and socket 0600")
    } else {
        fail("files", format!("readable by others: {}", loose.join(", ")), fixes.join("; "))
    }
}

/// The permission bits of `path`, when it exists.
fn mode(path: &Path) -> Option<u32> {
    std::fs::metadata(path).ok().map(|m| m.permissions().mode() & 0o777)
}

fn disk(home: &Home) -> Check {
    match nix::sys::statvfs::statvfs(&home.data_dir) {
        Ok(s) => {
            let free = s.blocks_available().saturating_mul(s.fragment_size());
            let shown = format!("{} MiB free in {}", free / (1024 * 1024), home.data_dir.display());
            if free >= MIN_FREE_BYTES {
                pass("disk", shown)
            } else {
                fail("disk", shown, "free some space: messages are refused when the database cannot grow")
            }
        }
        Err(e) => fail("disk", format!("cannot read {}: {e}", home.data_dir.display()), "mesh daemon up creates it"),
    }
}

/// Installed or not, and when installed, enabled.
fn service() -> Check {
    let Ok(service) = super::daemon::service() else {
        return pass("service", "no service for this home (MESH_HOME cannot be named in one)");
    };
    let Some(file) = service.installed_file() else {
        return pass(
            "service",
            "not installed: the daemon runs until you stop it (optional: mesh daemon install-service)",
        );
    };
    if cfg!(target_os = "macos") {
        return pass("service", format!("installed ({})", file.display()));
    }
    let unit = format!("{}.service", service.name());
    match std::process::Command::new("systemctl").args(["--user", "is-enabled", &unit]).output() {
        Ok(out) if out.status.success() => pass("service", format!("{unit} installed and enabled")),
        Ok(out) => fail(
            "service",
            format!("{unit} installed but {}", String::from_utf8_lossy(&out.stdout).trim()),
            format!("systemctl --user enable --now {unit}"),
        ),
        Err(_) => pass("service", format!("{unit} installed (systemctl is not available to say more)")),
    }
}

/// A `wss://` mesh's broker certificate: the pinned one, or one an authority here vouches for. Asked
/// only of a broker that answered lately (online, or refused): one that does not answer has failed
/// its own check already.
fn certificate(client: &mesh_ipc::IpcClient, m: &mesh_ipc::api::MeshStatus) -> Option<Check> {
    use mesh_ipc::api::{RepinRequest, RepinResponse, Transport};
    let name = format!("certificate ({})", m.name);
    if m.transport == Transport::Unencrypted {
        return Some(pass(
            name,
            "none: plain ws:// to another machine (--insecure); metadata is visible on the network",
        ));
    }
    if !matches!(m.transport, Transport::Tls | Transport::TlsPinned)
        || !matches!(m.connection.state, LinkState::Online | LinkState::Rejected)
    {
        return None;
    }
    // The daemon connects to look: up to its connect timeout.
    let request = RepinRequest { mesh: Some(m.name.clone()), pin: None, unpin: false };
    let asked = super::block_on(async {
        let probe = client.post::<_, RepinResponse>(routes::MESHES_REPIN, &request);
        tokio::time::timeout(std::time::Duration::from_secs(15), probe).await
    });
    let seen = match asked {
        Ok(Ok(Ok(seen))) => seen,
        Ok(Ok(Err(e))) => {
            return Some(fail(name, e.to_string(), "mesh repin --mesh NAME shows what the broker presents"));
        }
        Ok(Err(_)) | Err(_) => {
            return Some(fail(name, "no answer in time", "try again; check that the broker answers"));
        }
    };
    let fix_pin = format!(
        "if the broker's operator confirms {} as its certificate: mesh repin --mesh {} --pin {}",
        seen.presented, m.name, seen.presented
    );
    let operator_fix = |why: &str| {
        if why.contains("expired") || why.contains("not valid yet") {
            "the broker's operator renews its certificate (then sends the broker SIGHUP; members of a pinned mesh \
             then run mesh repin); for one not valid yet, check this machine's clock"
                .to_owned()
        } else if why.contains("is not for") {
            format!("reach the broker by a name its certificate is for, or its operator adds this one ({})", m.broker)
        } else {
            format!(
                "if the broker is self-signed, confirm {} with its operator and pin it: mesh repin --mesh {} --pin {}",
                seen.presented, m.name, seen.presented
            )
        }
    };
    Some(match (&m.tls_pin, &seen.pin_refused) {
        (Some(pin), _) if *pin != seen.presented => {
            let detail = format!("broker certificate changed: expected {pin}, got {}", seen.presented);
            let fix = match &seen.presented_refused {
                // Pinning what is presented would not work either.
                Some(why) => format!("{why}: {}", operator_fix(why)),
                None if seen.trusted_by_platform => format!(
                    "an authority here vouches for the new certificate: mesh repin --mesh {} --unpin (or pin it: {fix_pin})",
                    m.name
                ),
                None => fix_pin,
            };
            fail(name, detail, fix)
        }
        (Some(_), Some(why)) => fail(name, why.clone(), operator_fix(why)),
        (Some(pin), None) => pass(name, format!("pinned {pin}, and the broker presents it")),
        (None, _) if seen.trusted_by_platform => {
            pass(name, "vouched for by a certificate authority this machine trusts")
        }
        (None, _) => {
            let why = seen.platform_refused.clone().unwrap_or_else(|| "refused".into());
            let fix = operator_fix(&why);
            fail(name, why, fix)
        }
    })
}

/// The checks that ask the daemon: each mesh's broker and clock, dead letters, webhooks, sessions.
/// `Err`: the daemon stopped answering.
fn daemon_checks(client: &mesh_ipc::IpcClient, checks: &mut Vec<Check>) -> anyhow::Result<Result<(), String>> {
    let status: Status = match ask(client.get(routes::STATUS))? {
        Ok(s) => s,
        Err(why) => return Ok(Err(why)),
    };
    for m in &status.meshes {
        let c = &m.connection;
        let name = format!("mesh {}", m.name);
        checks.push(match c.state {
            LinkState::Online => pass(
                name,
                format!("broker {} reachable, {} of {} peers online", m.broker, m.peers_online, m.peers_total),
            ),
            state => fail(
                name,
                format!(
                    "{} since {}{}",
                    state.as_str(),
                    output::ago(c.since),
                    c.last_error.as_deref().map(|e| format!(": {e}")).unwrap_or_default()
                ),
                if c.last_error.as_deref().is_some_and(|e| e.contains("certificate")) {
                    format!("see the certificate ({}) check", m.name)
                } else if c.last_error.as_deref().is_some_and(|e| e.starts_with("unknown_mesh")) {
                    format!(
                        "the mesh is gone from its broker (deleted by its owner, or the broker was restored from an older backup): `mesh leave --yes --mesh {}` forgets it here",
                        m.name
                    )
                } else if c.last_error.as_deref().is_some_and(|e| e.starts_with("revoked") || e.starts_with("unknown_member")) {
                    format!(
                        "you are no longer in this mesh: an invite made now lets you back in (mesh join TOKEN), or `mesh leave --yes --mesh {}` forgets it here",
                        m.name
                    )
                } else {
                    format!("check that the broker at {} runs and that this machine reaches it", m.broker)
                },
            ),
        });
        if let Some(check) = certificate(client, m) {
            checks.push(check);
        }
        // Measured at the last welcome: only said while the link is up.
        if let Some(skew) = c.clock_skew_ms.filter(|_| c.state == LinkState::Online) {
            let name = format!("clock ({})", m.name);
            let detail = format!("{:+.1} s against the broker", skew as f64 / 1000.0);
            checks.push(if skew.abs() <= MAX_SKEW_MS {
                pass(name, detail)
            } else {
                fail(name, detail, "set this machine's clock from the network (timedatectl set-ntp true), or ask the broker's operator to")
            });
        }
    }
    let dead = status.outbox.dead;
    checks.push(if dead == 0 {
        pass("outbox", format!("{} pending, no dead letters", status.outbox.pending + status.outbox.inflight))
    } else {
        fail(
            "outbox",
            format!("{dead} dead letters"),
            "mesh outbox --status dead shows why; mesh outbox retry ID sends one again",
        )
    });
    let w = &status.webhooks;
    if w.endpoints > 0 {
        let dead = w.deliveries.dead;
        checks.push(if dead == 0 && w.disabled.is_empty() {
            pass("webhooks", format!("{} endpoints, {} deliveries pending", w.endpoints, w.deliveries.pending))
        } else {
            fail(
                "webhooks",
                format!("{} disabled endpoints, {dead} dead deliveries", w.disabled.len()),
                "mesh webhook list; fix the endpoint, then mesh webhook enable ID and mesh webhook redeliver --all-dead ID",
            )
        });
    }
    let sessions: Vec<SessionInfo> = match ask(client.get(routes::SESSIONS))? {
        Ok(s) => s,
        Err(why) => return Ok(Err(why)),
    };
    let stuck: Vec<String> = sessions
        .iter()
        .filter(|s| s.live && s.connection.as_ref().is_some_and(|c| c.state != LinkState::Online))
        .map(|s| s.name.clone())
        .collect();
    let live = sessions.iter().filter(|s| s.live).count();
    checks.push(if stuck.is_empty() {
        pass("sessions", format!("{live} live, every one connected"))
    } else {
        fail(
            "sessions",
            format!("live but not connected: {}", stuck.join(", ")),
            "mesh session list says why; a session whose process is gone ends by itself within a second",
        )
    });
    Ok(Ok(()))
}
