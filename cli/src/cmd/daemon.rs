//! `mesh daemon up|down|status|install-service|uninstall-service`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use mesh_daemon::lifecycle;
use mesh_ipc::api::{LinkState, Status, VersionInfo};
use mesh_ipc::{Home, IpcClient, IpcError, routes};

use crate::output;

/// How long `up` waits for the detached daemon to answer, and `down` for it to exit.
const START_WAIT: Duration = Duration::from_secs(15);
const STOP_WAIT: Duration = Duration::from_secs(15);
const POLL: Duration = Duration::from_millis(20);
const SERVICE_NAME: &str = "mesh-daemon";

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
        /// Internal: set by `up` on the process it detaches
        #[arg(long, hide = true)]
        detached_child: bool,
    },
    /// Ask the daemon to finish in-flight work and exit
    Down,
    /// Show the daemon's state, its broker connections and queue counts
    Status,
    /// Install a user service (systemd or launchd) running `mesh daemon up --foreground`
    InstallService {
        /// Write the unit file only; do not enable or start it
        #[arg(long)]
        no_start: bool,
    },
    /// Stop and remove the user service
    UninstallService,
}

pub fn run(cmd: DaemonCommand) -> anyhow::Result<()> {
    let home = super::home()?;
    match cmd {
        DaemonCommand::Up { foreground: true, no_embedded, detached_child } => {
            foreground(home, no_embedded, detached_child)
        }
        DaemonCommand::Up { foreground: false, no_embedded, .. } => up(home, no_embedded),
        DaemonCommand::Down => down(home),
        DaemonCommand::Status => status(home),
        DaemonCommand::InstallService { no_start } => install_service(&home, no_start),
        DaemonCommand::UninstallService => uninstall_service(),
    }
}

fn foreground(home: Home, no_embedded: bool, detached_child: bool) -> anyhow::Result<()> {
    if detached_child {
        lifecycle::detach_from_terminal().context("detaching from the terminal")?;
    }
    let options = mesh_daemon::Options { embedded: !no_embedded, log_stderr: !detached_child };
    mesh_daemon::run(home, options)?;
    Ok(())
}

async fn probe(client: &IpcClient) -> Result<VersionInfo, IpcError> {
    client.get(routes::VERSION).await
}

fn up(home: Home, no_embedded: bool) -> anyhow::Result<()> {
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
    let log = std::fs::File::create(&log_path).with_context(|| format!("creating {}", log_path.display()))?;
    let exe = std::env::current_exe().context("finding the mesh executable")?;
    let mut command = std::process::Command::new(exe);
    command.args(["daemon", "up", "--foreground", "--detached-child"]);
    if no_embedded {
        command.arg("--no-embedded");
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
    let client = IpcClient::new(&home);
    let asked: Result<serde_json::Value, IpcError> =
        super::block_on(client.post(routes::SHUTDOWN, &serde_json::json!({})))?;
    match asked {
        Ok(_) => {}
        Err(IpcError::Unreachable { .. }) if !lifecycle::is_running(&home) => {
            if output::json() {
                return output::print_json(&serde_json::json!({ "stopped": false, "was_running": false }));
            }
            outln!("mesh daemon is not running");
            return Ok(());
        }
        Err(e) => {
            let pid = lifecycle::read_pid(&home).map(|p| format!(" (pid {p})")).unwrap_or_default();
            return Err(anyhow::Error::new(e).context(format!("the daemon{pid} holds its lock but does not answer")));
        }
    }
    let deadline = Instant::now() + STOP_WAIT;
    while lifecycle::is_running(&home) {
        if Instant::now() >= deadline {
            bail!("the daemon did not exit within {}s; see {}", STOP_WAIT.as_secs(), home.log_dir.display());
        }
        std::thread::sleep(POLL);
    }
    if output::json() {
        return output::print_json(&serde_json::json!({ "stopped": true, "was_running": true }));
    }
    outln!("mesh daemon stopped");
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
    outln!("member:  {} ({})", status.member.name, status.member.key);
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
        outln!(
            "mesh {}: {} since {} via {}; {}/{} peers online; outbox {} pending{}",
            m.name,
            conn.state.as_str(),
            output::ago(conn.since),
            m.broker,
            m.peers_online,
            m.peers_total,
            m.outbox.pending + m.outbox.inflight,
            err
        );
    }
}

fn unit_path() -> anyhow::Result<PathBuf> {
    let dir = dirs::config_dir().context("cannot find the user's config directory")?;
    Ok(dir.join("systemd").join("user").join(format!("{SERVICE_NAME}.service")))
}

/// The systemd user unit: `mesh daemon up --foreground`, restarted on failure.
pub fn systemd_unit(exe: &Path, mesh_home: Option<&Path>) -> String {
    let env = mesh_home.map(|h| format!("Environment=MESH_HOME={}\n", h.display())).unwrap_or_default();
    format!(
        "[Unit]\n\
         Description=mesh daemon: durable, end-to-end encrypted messaging between agent sessions\n\
         After=network-online.target\n\
         \n\
         [Service]\n\
         Type=simple\n\
         ExecStart={} daemon up --foreground\n\
         {env}\
         Restart=on-failure\n\
         RestartSec=2\n\
         \n\
         [Install]\n\
         WantedBy=default.target\n",
        exe.display()
    )
}

/// The launchd agent for macOS.
pub fn launchd_plist(exe: &Path, mesh_home: Option<&Path>) -> String {
    let env = mesh_home
        .map(|h| {
            format!(
                "  <key>EnvironmentVariables</key>\n  <dict><key>MESH_HOME</key><string>{}</string></dict>\n",
                h.display()
            )
        })
        .unwrap_or_default();
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
         <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
         <plist version=\"1.0\">\n<dict>\n\
         \x20 <key>Label</key><string>dev.mesh.daemon</string>\n\
         \x20 <key>ProgramArguments</key>\n\
         \x20 <array><string>{}</string><string>daemon</string><string>up</string><string>--foreground</string></array>\n\
         {env}\
         \x20 <key>RunAtLoad</key><true/>\n\
         \x20 <key>KeepAlive</key><dict><key>SuccessfulExit</key><false/></dict>\n\
         </dict>\n</plist>\n",
        exe.display()
    )
}

fn mesh_home_env() -> Option<PathBuf> {
    std::env::var_os(mesh_ipc::paths::HOME_ENV)
        .filter(|v| !v.is_empty())
        .map(|v| std::path::absolute(PathBuf::from(v)).unwrap_or_default())
}

fn systemctl(args: &[&str]) -> bool {
    std::process::Command::new("systemctl")
        .arg("--user")
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn install_service(home: &Home, no_start: bool) -> anyhow::Result<()> {
    let exe = std::env::current_exe().context("finding the mesh executable")?;
    let mesh_home = mesh_home_env();
    if cfg!(target_os = "macos") {
        let dir = dirs::home_dir().context("no home directory")?.join("Library/LaunchAgents");
        std::fs::create_dir_all(&dir)?;
        let path = dir.join("dev.mesh.daemon.plist");
        std::fs::write(&path, launchd_plist(&exe, mesh_home.as_deref()))?;
        outln!("wrote {}", path.display());
        if !no_start {
            let uid = std::process::Command::new("id").arg("-u").output()?;
            let domain = format!("gui/{}", String::from_utf8_lossy(&uid.stdout).trim());
            let _ = std::process::Command::new("launchctl")
                .args(["bootout", &domain, &path.display().to_string()])
                .status();
            let ok = std::process::Command::new("launchctl")
                .args(["bootstrap", &domain, &path.display().to_string()])
                .status()?;
            if !ok.success() {
                bail!(
                    "launchctl bootstrap failed; load it yourself with: launchctl bootstrap {domain} {}",
                    path.display()
                );
            }
            outln!("loaded with launchctl ({domain})");
        }
        return Ok(());
    }
    let path = unit_path()?;
    std::fs::create_dir_all(path.parent().context("unit path has a parent")?)?;
    std::fs::write(&path, systemd_unit(&exe, mesh_home.as_deref()))?;
    outln!("wrote {}", path.display());
    if no_start {
        outln!("enable it with: systemctl --user daemon-reload && systemctl --user enable --now {SERVICE_NAME}");
        return Ok(());
    }
    if !systemctl(&["daemon-reload"]) {
        outln!("systemd's user manager is not reachable here; enable the unit later with:");
        outln!("  systemctl --user daemon-reload && systemctl --user enable --now {SERVICE_NAME}");
        return Ok(());
    }
    // A daemon started by hand would hold the lock and make the service fail; hand over to systemd.
    if lifecycle::is_running(home) {
        down(home.clone())?;
    }
    if !systemctl(&["enable", "--now", SERVICE_NAME]) {
        bail!("`systemctl --user enable --now {SERVICE_NAME}` failed; see `systemctl --user status {SERVICE_NAME}`");
    }
    outln!("enabled and started {SERVICE_NAME}");
    Ok(())
}

fn uninstall_service() -> anyhow::Result<()> {
    if cfg!(target_os = "macos") {
        let path = dirs::home_dir().context("no home directory")?.join("Library/LaunchAgents/dev.mesh.daemon.plist");
        let uid = std::process::Command::new("id").arg("-u").output()?;
        let domain = format!("gui/{}", String::from_utf8_lossy(&uid.stdout).trim());
        let _ =
            std::process::Command::new("launchctl").args(["bootout", &domain, &path.display().to_string()]).status();
        remove_if_present(&path)?;
        return Ok(());
    }
    let path = unit_path()?;
    systemctl(&["disable", "--now", SERVICE_NAME]);
    remove_if_present(&path)?;
    systemctl(&["daemon-reload"]);
    Ok(())
}

fn remove_if_present(path: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(path) {
        Ok(()) => outln!("removed {}", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            outln!("no service installed ({} absent)", path.display())
        }
        Err(e) => return Err(e).with_context(|| format!("removing {}", path.display())),
    }
    Ok(())
}
