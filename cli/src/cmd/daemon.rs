//! `mesh daemon up|down|status|install-service|uninstall-service`.

use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh_daemon::lifecycle;
use mesh_ipc::api::{LinkState, Status, VersionInfo};
use mesh_ipc::{Home, IpcClient, IpcError, routes};

use super::service;
use crate::output;

/// How long `up` waits for the detached daemon to answer, and `down` for it to exit.
const START_WAIT: Duration = Duration::from_secs(15);
const STOP_WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);

#[derive(clap::Subcommand, Debug)]
pub enum DaemonCommand {
    /// Start the daemon (detached unless --foreground) and wait until it answers
    Up {
        /// Run in this process (for service managers)
        #[arg(long)]
        foreground: bool,
        /// Do not start a local mesh on an embedded broker when no mesh is joined
        #[arg(long)]
        no_embedded: bool,
        /// Start on a new, empty database although the last one was found corrupt and moved aside
        /// (your meshes and their keys are then gone from this home: join them again)
        #[arg(long)]
        fresh: bool,
        /// With --foreground: stop a daemon already running for this home first, and take its place
        /// (service units use it, so that starting the service hands over from a daemon started by hand)
        #[arg(long, requires = "foreground")]
        replace: bool,
        /// Internal: set by `up` on the process it detaches
        #[arg(long, hide = true)]
        detached_child: bool,
    },
    /// Ask the daemon to finish in-flight work and exit
    Down,
    /// Show the daemon's state, its broker connections and queue counts
    Status,
    /// Install a user service (systemd or launchd; one per MESH_HOME) running the daemon, and hand the
    /// running daemon over to it
    InstallService {
        /// Write the unit file only; do not enable or start it
        #[arg(long)]
        no_start: bool,
    },
    /// Stop and remove the user service
    UninstallService,
    /// Write a consistent copy of the daemon's state (keys, meshes, inbox, outbox, the local mesh's
    /// broker) to a new file, while it runs. The file holds your secret keys and messages in
    /// plaintext: keep it as a secret
    Backup {
        /// The file to write (refused if it exists)
        #[arg(long, value_name = "FILE")]
        to: std::path::PathBuf,
    },
    /// Replace this home's state with a backup, with the daemon stopped; the files replaced are kept
    /// in a directory of their own
    Restore {
        /// The backup to restore
        #[arg(long, value_name = "FILE")]
        from: std::path::PathBuf,
        /// Restore it although this home is another member (its identity is kept aside)
        #[arg(long)]
        replace_identity: bool,
    },
}

pub fn run(cmd: DaemonCommand) -> anyhow::Result<()> {
    let home = super::home()?;
    match cmd {
        DaemonCommand::Up { foreground: true, no_embedded, fresh, replace, detached_child } => {
            if replace && lifecycle::is_running(&home) {
                stop(home.clone()).context("stopping the daemon it replaces")?;
            }
            foreground(home, no_embedded, fresh, detached_child)
        }
        DaemonCommand::Up { foreground: false, no_embedded, fresh, .. } => up(home, no_embedded, fresh),
        DaemonCommand::Down => down(home),
        DaemonCommand::Status => status(home),
        DaemonCommand::InstallService { no_start } => install_service(&home, no_start),
        DaemonCommand::UninstallService => uninstall_service(),
        DaemonCommand::Backup { to } => backup(home, &to),
        DaemonCommand::Restore { from, replace_identity } => restore(&home, &from, replace_identity),
    }
}

fn foreground(home: Home, no_embedded: bool, fresh: bool, detached_child: bool) -> anyhow::Result<()> {
    if detached_child {
        lifecycle::detach_from_terminal().context("detaching from the terminal")?;
    }
    let options = mesh_daemon::Options { embedded: !no_embedded, log_stderr: !detached_child, fresh };
    mesh_daemon::run(home, options)?;
    Ok(())
}

async fn probe(client: &IpcClient) -> Result<VersionInfo, IpcError> {
    client.get(routes::VERSION).await
}

fn up(home: Home, no_embedded: bool, fresh: bool) -> anyhow::Result<()> {
    let client = IpcClient::new(&home);
    if let Ok(v) = super::block_on(probe(&client))? {
        if output::json() {
            let status: Status = super::block_on(client.get(routes::STATUS))??;
            return print_up(&status, false);
        }
        outln!("mesh daemon is already running (pid {}, version {})", v.pid, v.version);
        return Ok(());
    }
    home.ensure_dirs().context("creating mesh's directories")?;
    let log_path = home.startup_log();
    // 0600: it may hold a configuration error quoting the file.
    let log = {
        use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
        let f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&log_path)
            .with_context(|| format!("creating {}", log_path.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f
    };
    let exe = std::env::current_exe().context("finding the mesh executable")?;
    let mut command = std::process::Command::new(exe);
    command.args(["daemon", "up", "--foreground", "--detached-child"]);
    if no_embedded {
        command.arg("--no-embedded");
    }
    if fresh {
        command.arg("--fresh");
    }
    // A daemon serves every session; it must not inherit the one that started it.
    command.env_remove("MESH_SESSION_FILE").stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
    let mut child = command.spawn().context("starting the daemon")?;
    let deadline = Instant::now() + START_WAIT;
    loop {
        if super::block_on(probe(&client))?.is_ok() {
            break;
        }
        if let Some(exit) = child.try_wait()? {
            // Another `up` may have won the race; that daemon answers soon.
            if lifecycle::is_running(&home) && wait_for_answer(&client, deadline)? {
                break;
            }
            let out = std::fs::read_to_string(&log_path).unwrap_or_default();
            bail!("the daemon exited during start-up ({exit}):\n{}", out.trim_end());
        }
        if Instant::now() >= deadline {
            bail!("the daemon did not answer within {}s; see {}", START_WAIT.as_secs(), home.log_dir.display());
        }
        std::thread::sleep(POLL);
    }
    let status: Status = super::block_on(client.get(routes::STATUS))??;
    if output::json() {
        return print_up(&status, true);
    }
    outln!("mesh daemon started (pid {}, version {})", status.pid, status.version);
    print_meshes_summary(&status);
    if let Some(m) = status.meshes.first() {
        outln!("\nsend a message:  mesh send <name> \"hello\"     (names: mesh peers)");
        if status.embedded_broker.is_some() && m.peers_total == 0 {
            outln!("invite another home on this machine:  mesh invite");
        }
    }
    Ok(())
}

/// `up --json`: the daemon's status, and whether this command started it.
fn print_up(status: &Status, started: bool) -> anyhow::Result<()> {
    let mut v = serde_json::to_value(status)?;
    v["started"] = serde_json::Value::Bool(started);
    output::print_json(&v)
}

fn wait_for_answer(client: &IpcClient, deadline: Instant) -> anyhow::Result<bool> {
    while Instant::now() < deadline {
        if super::block_on(probe(client))?.is_ok() {
            return Ok(true);
        }
        std::thread::sleep(POLL);
    }
    Ok(false)
}

fn down(home: Home) -> anyhow::Result<()> {
    let was_running = stop(home)?;
    if output::json() {
        return output::print_json(&serde_json::json!({ "stopped": was_running, "was_running": was_running }));
    }
    outln!("{}", if was_running { "mesh daemon stopped" } else { "mesh daemon is not running" });
    Ok(())
}

/// Asks the daemon to stop and waits until it has; false when none was running. Inside a session the
/// request carries the session's token, and the daemon refuses it: only the member stops the daemon.
fn stop(home: Home) -> anyhow::Result<bool> {
    let client = super::client()?;
    let asked: Option<Result<serde_json::Value, IpcError>> = super::block_on(async {
        tokio::time::timeout(ANSWER_WAIT, client.post(routes::SHUTDOWN, &serde_json::json!({}))).await.ok()
    })?;
    let Some(asked) = asked else {
        // Connected, but no answer (a stopped or wedged process): stopped by its pid like one whose
        // socket is gone.
        return signal_stop(&home);
    };
    match asked {
        Ok(_) => {}
        Err(IpcError::Unreachable { .. }) if !lifecycle::is_running(&home) => return Ok(false),
        // It holds the lock but its socket does not answer (deleted, or the daemon is stuck): the
        // lock file names its pid, and a signal stops it.
        Err(IpcError::Unreachable { .. }) => return signal_stop(&home),
        Err(e) => return Err(e.into()),
    }
    if wait_until_stopped(&home, STOP_WAIT) {
        return Ok(true);
    }
    bail!("the daemon did not exit within {}s; see {}", STOP_WAIT.as_secs(), home.log_dir.display());
}

fn wait_until_stopped(home: &Home, wait: Duration) -> bool {
    let deadline = Instant::now() + wait;
    while lifecycle::is_running(home) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(POLL);
    }
    true
}

/// How long the daemon may take to answer the request to stop before it is stopped by signal.
const ANSWER_WAIT: Duration = Duration::from_secs(5);

/// How long a daemon stopped by signal gets to exit after SIGTERM before SIGKILL.
const TERM_WAIT: Duration = Duration::from_secs(5);

/// Stops the daemon that holds the lock by its pid: SIGTERM (it drains and exits), then SIGKILL.
fn signal_stop(home: &Home) -> anyhow::Result<bool> {
    use nix::sys::signal::{Signal, kill};
    let pid = lifecycle::read_pid(home)
        .context("the daemon holds its lock but does not answer, and its lock file names no pid")?;
    let pid = nix::unistd::Pid::from_raw(i32::try_from(pid).context("a pid out of range in the lock file")?);
    errln!("mesh: the daemon (pid {pid}) does not answer on its socket; stopping it with SIGTERM");
    kill(pid, Signal::SIGTERM).with_context(|| format!("signalling pid {pid}"))?;
    if wait_until_stopped(home, TERM_WAIT) {
        return Ok(true);
    }
    errln!("mesh: the daemon (pid {pid}) did not exit within {}s; SIGKILL", TERM_WAIT.as_secs());
    kill(pid, Signal::SIGKILL).with_context(|| format!("signalling pid {pid}"))?;
    if wait_until_stopped(home, TERM_WAIT) {
        return Ok(true);
    }
    bail!("the daemon (pid {pid}) still holds its lock after SIGKILL")
}

fn backup(home: Home, to: &std::path::Path) -> anyhow::Result<()> {
    let to = std::path::absolute(to).with_context(|| format!("the path {}", to.display()))?;
    let Some(to_text) = to.to_str() else {
        return Err(output::fail("usage", format!("{} is not a UTF-8 path", to.display()), None));
    };
    // Inside a session, as that session: the daemon refuses it (a backup holds the member's keys).
    let client = super::client()?;
    let _ = home;
    let info: mesh_ipc::api::BackupInfo =
        super::block_on(client.post(routes::BACKUP, &mesh_ipc::api::BackupRequest { to: to_text.to_owned() }))??;
    if output::json() {
        return super::print_json(&info);
    }
    let files: Vec<&str> = info.files.iter().map(|f| f.name.as_str()).collect();
    outln!("backed up to {} ({}: {})", info.path, output::bytes(info.bytes), files.join(", "));
    outln!("it holds your secret keys and your messages in plaintext: keep it as you keep the keys (it is 0600)");
    outln!("restore it with `mesh daemon restore --from {}` (the daemon stopped)", info.path);
    Ok(())
}

fn restore(home: &Home, from: &std::path::Path, replace_identity: bool) -> anyhow::Result<()> {
    use mesh_daemon::backup::RestoreError;
    let from = &std::path::absolute(from).unwrap_or_else(|_| from.to_owned());
    let restored = mesh_daemon::backup::restore(home, from, replace_identity).map_err(|e| match &e {
        RestoreError::Running { .. } => output::fail("daemon_running", e.to_string(), Some("mesh daemon down".into())),
        RestoreError::OtherMember { .. } => output::fail(
            "conflict",
            e.to_string(),
            Some("restore it into a home of its own (MESH_HOME=DIR), or pass --replace-identity".into()),
        ),
        _ => output::fail("failed", mesh_proto::error::chain(&e), None),
    })?;
    if output::json() {
        return super::print_json(&serde_json::json!({
            "restored_from": from,
            "created_at": restored.manifest.created_at,
            "member": restored.manifest.member,
            "files": restored.manifest.files.iter().map(|f| serde_json::json!({"name": f.name, "bytes": f.bytes})).collect::<Vec<_>>(),
            "replaced": restored.replaced,
        }));
    }
    outln!(
        "restored the backup taken {} ({})",
        output::time(restored.manifest.created_at),
        restored.manifest.files.iter().map(|f| f.name.as_str()).collect::<Vec<_>>().join(", ")
    );
    if let Some(dir) = &restored.replaced {
        outln!("the files it replaced are in {}", dir.display());
    }
    outln!(
        "start the daemon with `mesh daemon up`: sends not yet accepted when the backup was taken go out again (the broker recognises those it already has)"
    );
    Ok(())
}

fn status(home: Home) -> anyhow::Result<()> {
    let client = IpcClient::new(&home);
    let status: Status = super::block_on(client.get(routes::STATUS))??;
    if crate::output::json() {
        return super::print_json(&status);
    }
    outln!(
        "mesh daemon: running (pid {}, version {}, up since {})",
        status.pid,
        status.version,
        output::time(status.started_at)
    );
    outln!("member:  {} ({})", output::clean(&status.member.name), status.member.key);
    outln!("socket:  {}", status.socket);
    if let Some(url) = &status.embedded_broker {
        outln!("embedded broker: {url}");
    }
    print_meshes_summary(&status);
    let o = status.outbox;
    outln!(
        "outbox:  {} pending, {} in flight, {} done, {} dead, {} aborted",
        o.pending,
        o.inflight,
        o.done,
        o.dead,
        o.aborted
    );
    let i = status.inbox;
    outln!("inbox:   {} unread of {}, {} failed", i.unread, i.total, i.failed);
    let w = &status.webhooks;
    if w.endpoints > 0 {
        let d = &w.deliveries;
        outln!(
            "webhooks: {} endpoint{}, {} disabled; deliveries {} pending ({} failing), {} dead",
            w.endpoints,
            if w.endpoints == 1 { "" } else { "s" },
            w.disabled.len(),
            d.pending,
            d.failing,
            d.dead
        );
        for x in &w.disabled {
            outln!("{}", output::clean(&format!("  webhook #{} {} is DISABLED: {}", x.id, x.url, x.reason)));
        }
        if !w.disabled.is_empty() {
            outln!("  fix the endpoint, then `mesh webhook enable ID`");
        }
    }
    Ok(())
}

fn print_meshes_summary(status: &Status) {
    if status.meshes.is_empty() {
        outln!("meshes:  none (create one with `mesh create`, or join with `mesh join`)");
    }
    for m in &status.meshes {
        let conn = &m.connection;
        let err = conn
            .last_error
            .as_deref()
            .filter(|_| conn.state != LinkState::Online)
            .map(|e| format!(" — {e}"))
            .unwrap_or_default();
        // With several addresses, the one this link is on.
        let via = match conn.address.as_deref() {
            Some(at) if at != m.broker => format!("{at} (of {})", m.broker),
            _ => m.broker.clone(),
        };
        let line = format!(
            "mesh {} (as {}): {} since {} via {}{}; {}/{} peers online; outbox {} pending{}",
            m.name,
            m.my_name,
            conn.state.as_str(),
            output::ago(conn.since),
            via,
            super::meshes::transport_note(m.transport),
            m.peers_online,
            m.peers_total,
            m.outbox.pending + m.outbox.inflight,
            err
        );
        outln!("{}", output::clean(&line));
    }
}

/// The daemon's service for this home: `mesh daemon up --foreground --replace`, so that starting it
/// takes over from a daemon started by hand.
pub(crate) fn service() -> anyhow::Result<service::Service> {
    Ok(service::Service {
        kind: "daemon",
        description: "mesh daemon: durable, end-to-end encrypted messaging between agent sessions",
        args: ["daemon", "up", "--foreground", "--replace"].map(str::to_owned).to_vec(),
        mesh_home: service::mesh_home_env()?,
        env: trust_env()?,
    })
}

/// Where this shell's daemon finds the certificate authorities it trusts, when set: the service's
/// daemon must trust the same ones (a company CA given by `SSL_CERT_FILE`, say), made absolute.
fn trust_env() -> anyhow::Result<Vec<(String, String)>> {
    let mut env = Vec::new();
    for key in ["SSL_CERT_FILE", "SSL_CERT_DIR"] {
        if let Some(value) = std::env::var_os(key).filter(|v| !v.is_empty()) {
            let value = match key {
                // A list of directories, `:`-separated.
                "SSL_CERT_DIR" => std::env::split_paths(&value)
                    .map(|p| service::absolute(&p))
                    .collect::<anyhow::Result<Vec<_>>>()
                    .and_then(|dirs| Ok(std::env::join_paths(dirs)?))?,
                _ => service::absolute(std::path::Path::new(&value))?.into_os_string(),
            };
            env.push((key.to_owned(), value.to_string_lossy().into_owned()));
        }
    }
    Ok(env)
}

fn install_service(home: &Home, no_start: bool) -> anyhow::Result<()> {
    let handover = || {
        // A daemon started by hand would hold the lock; the unit's `--replace` takes over anyway,
        // but stopping it first keeps the hand-over clean.
        if lifecycle::is_running(home) {
            let _ = stop(home.clone());
        }
    };
    let done = service::install(&service()?, no_start, handover)?;
    service::report_installed(&done)
}

fn uninstall_service() -> anyhow::Result<()> {
    let svc = service()?;
    let removed = service::uninstall(&svc)?;
    service::report_uninstalled(&svc, removed)
}
