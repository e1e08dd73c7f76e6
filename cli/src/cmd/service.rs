//! User services for the daemon and the broker: a systemd user unit (a launchd agent on macOS) per
//! program and `MESH_HOME`, so that two homes never overwrite each other's service.

use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use sha2::Digest;

/// What to install: which program, for which home, doing what.
pub struct Service {
    /// `daemon` or `broker`.
    pub kind: &'static str,
    pub description: &'static str,
    /// The arguments after the `mesh` executable.
    pub args: Vec<String>,
    /// The `MESH_HOME` it serves (absolute), when one is set.
    pub mesh_home: Option<PathBuf>,
    /// More environment for it (a broker's create token: never on a command line, where `ps` shows
    /// it to every user; the unit file is 0600).
    pub env: Vec<(String, String)>,
}

impl Service {
    /// `mesh-daemon` for the default home; for a `MESH_HOME`, `mesh-daemon-<last component>-<hash>`
    /// (the hash of the whole path keeps two homes with the same last component apart).
    pub fn name(&self) -> String {
        let base = format!("mesh-{}", self.kind);
        let Some(home) = &self.mesh_home else { return base };
        let digest = sha2::Sha256::digest(home.as_os_str().as_encoded_bytes());
        let slug: String = home
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '-' })
            .take(24)
            .collect();
        let slug = slug.trim_matches('-');
        let hash = hex::encode(&digest[..4]);
        if slug.is_empty() { format!("{base}-{hash}") } else { format!("{base}-{slug}-{hash}") }
    }

    fn exec_line(&self, exe: &Path) -> String {
        std::iter::once(exe.display().to_string())
            .chain(self.args.iter().map(|a| quote_exec(a)))
            .collect::<Vec<_>>()
            .join(" ")
    }

    /// The systemd user unit: restarted always (a daemon a few times a minute at most), after the network.
    /// Every environment variable the service gets.
    fn environment(&self) -> Vec<(String, String)> {
        let home = self.mesh_home.iter().map(|h| (mesh_ipc::paths::HOME_ENV.to_owned(), h.display().to_string()));
        home.chain(self.env.iter().cloned()).collect()
    }

    pub fn systemd_unit(&self, exe: &Path) -> String {
        // A broker is started again however long that takes (its database may be away for a while);
        // a daemon a few times a minute at most.
        let start_limit = if self.kind == "broker" {
            "StartLimitIntervalSec=0\n"
        } else {
            "StartLimitIntervalSec=60\nStartLimitBurst=10\n"
        };
        let env: String =
            self.environment().iter().map(|(k, v)| format!("Environment={}\n", quote(&format!("{k}={v}")))).collect();
        format!(
            "[Unit]\n\
             Description={}\n\
             Wants=network-online.target\n\
             After=network-online.target\n\
             {start_limit}\
             \n\
             [Service]\n\
             Type=simple\n\
             ExecStart={}\n\
             {env}\
             Restart=always\n\
             RestartSec=2\n\
             \n\
             [Install]\n\
             WantedBy=default.target\n",
            self.description,
            self.exec_line(exe)
        )
    }

    pub fn launchd_label(&self) -> String {
        format!("dev.{}", self.name().replace('-', "."))
    }

    /// The launchd agent for macOS: kept alive, restarted after any exit.
    pub fn launchd_plist(&self, exe: &Path) -> String {
        let vars = self.environment();
        let env = if vars.is_empty() {
            String::new()
        } else {
            let entries: String =
                vars.iter().map(|(k, v)| format!("<key>{}</key><string>{}</string>", xml(k), xml(v))).collect();
            format!("  <key>EnvironmentVariables</key>\n  <dict>{entries}</dict>\n")
        };
        let args: String = std::iter::once(exe.display().to_string())
            .chain(self.args.iter().cloned())
            .map(|a| format!("<string>{}</string>", xml(&a)))
            .collect();
        format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n\
             <!DOCTYPE plist PUBLIC \"-//Apple//DTD PLIST 1.0//EN\" \"http://www.apple.com/DTDs/PropertyList-1.0.dtd\">\n\
             <plist version=\"1.0\">\n<dict>\n\
             \x20 <key>Label</key><string>{}</string>\n\
             \x20 <key>ProgramArguments</key>\n\
             \x20 <array>{args}</array>\n\
             {env}\
             \x20 <key>RunAtLoad</key><true/>\n\
             \x20 <key>KeepAlive</key><true/>\n\
             \x20 <key>ThrottleInterval</key><integer>5</integer>\n\
             </dict>\n</plist>\n",
            self.launchd_label()
        )
    }

    /// Where this service's unit (Linux) or agent (macOS) file is, when it is installed.
    pub fn installed_file(&self) -> Option<PathBuf> {
        let path = if cfg!(target_os = "macos") { self.plist_path() } else { self.unit_path() };
        path.ok().filter(|p| p.exists())
    }

    fn unit_path(&self) -> anyhow::Result<PathBuf> {
        let dir = dirs::config_dir().context("cannot find the user's config directory")?;
        Ok(dir.join("systemd").join("user").join(format!("{}.service", self.name())))
    }

    fn plist_path(&self) -> anyhow::Result<PathBuf> {
        let dir = dirs::home_dir().context("no home directory")?.join("Library/LaunchAgents");
        Ok(dir.join(format!("{}.plist", self.launchd_label())))
    }
}

/// A systemd `ExecStart`/`Environment` word: `%` doubled (systemd's specifiers), quoted when needed.
fn quote(word: &str) -> String {
    let word = word.replace('%', "%%");
    if !word.is_empty() && word.chars().all(|c| c.is_ascii_alphanumeric() || "-_./:=@,+%".contains(c)) {
        word
    } else {
        format!("\"{}\"", word.replace('\\', "\\\\").replace('"', "\\\""))
    }
}

/// An `ExecStart` word: as [`quote`], and `$` doubled, since systemd expands `$VAR` and `${VAR}` there
/// (not in `Environment=`).
fn quote_exec(word: &str) -> String {
    quote(&word.replace('$', "$$"))
}

fn xml(text: &str) -> String {
    text.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// `path` made absolute and lexically normal (no trailing `/`, no `.`), so that one directory always
/// names one service; refused when it holds a control character (it could not be written into a
/// unit file faithfully).
pub fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    let text = path.to_string_lossy();
    if text.chars().any(char::is_control) {
        bail!("the path {text:?} holds a control character; a service cannot use it");
    }
    let abs = std::path::absolute(path).with_context(|| format!("making {} absolute", path.display()))?;
    Ok(abs.components().collect())
}

/// The `MESH_HOME` this process serves, made [`absolute`].
pub fn mesh_home_env() -> anyhow::Result<Option<PathBuf>> {
    std::env::var_os(mesh_ipc::paths::HOME_ENV).filter(|v| !v.is_empty()).map(|v| absolute(Path::new(&v))).transpose()
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

/// What an install did, for `--json` and for people.
#[derive(Debug, serde::Serialize)]
pub struct Installed {
    pub name: String,
    pub file: PathBuf,
    pub started: bool,
    /// Why it was not started, and the command that would.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Writes the unit (or plist) and, unless `no_start`, enables and starts it. `before_start` runs just
/// before the service manager starts it (the daemon's handover).
pub fn install(service: &Service, no_start: bool, before_start: impl FnOnce()) -> anyhow::Result<Installed> {
    let exe = std::env::current_exe().context("finding the mesh executable")?;
    // A line break in a word would end its line of the unit and start another (which systemd would
    // read as a setting of its own). Which one, never its value: it may be a secret.
    if service.args.iter().any(|a| a.chars().any(char::is_control)) {
        bail!("an option for the service holds a control character (a line break?); a service cannot carry it");
    }
    if let Some((key, _)) = service.environment().iter().find(|(_, v)| v.chars().any(char::is_control)) {
        bail!("{key} holds a control character (a line break?); a service cannot carry it");
    }
    if cfg!(target_os = "macos") {
        let path = service.plist_path()?;
        std::fs::create_dir_all(path.parent().context("plist path has a parent")?)?;
        write_private(&path, &service.launchd_plist(&exe))?;
        let mut done = Installed { name: service.launchd_label(), file: path.clone(), started: false, note: None };
        if no_start {
            return Ok(done);
        }
        let domain = launchd_domain()?;
        let _ =
            std::process::Command::new("launchctl").args(["bootout", &domain, &path.display().to_string()]).status();
        before_start();
        let ok = std::process::Command::new("launchctl")
            .args(["bootstrap", &domain, &path.display().to_string()])
            .status()?;
        if !ok.success() {
            bail!("launchctl bootstrap failed; load it yourself with: launchctl bootstrap {domain} {}", path.display());
        }
        done.started = true;
        return Ok(done);
    }
    let path = service.unit_path()?;
    std::fs::create_dir_all(path.parent().context("unit path has a parent")?)?;
    write_private(&path, &service.systemd_unit(&exe))?;
    let name = service.name();
    let enable = format!("systemctl --user daemon-reload && systemctl --user enable --now {name}");
    let mut done = Installed { name: name.clone(), file: path, started: false, note: None };
    if no_start {
        done.note = Some(format!("enable it with: {enable}"));
        return Ok(done);
    }
    if !systemctl(&["daemon-reload"]) {
        done.note = Some(format!("systemd's user manager is not reachable here; enable the unit later with: {enable}"));
        return Ok(done);
    }
    before_start();
    if !systemctl(&["enable", "--now", &name]) {
        bail!("`systemctl --user enable --now {name}` failed; see `systemctl --user status {name}`");
    }
    done.started = true;
    Ok(done)
}

/// Stops and removes the service; `Ok(None)` when none was installed.
pub fn uninstall(service: &Service) -> anyhow::Result<Option<PathBuf>> {
    if cfg!(target_os = "macos") {
        let path = service.plist_path()?;
        let domain = launchd_domain()?;
        let _ =
            std::process::Command::new("launchctl").args(["bootout", &domain, &path.display().to_string()]).status();
        return remove_if_present(&path);
    }
    let path = service.unit_path()?;
    systemctl(&["disable", "--now", &service.name()]);
    let removed = remove_if_present(&path)?;
    systemctl(&["daemon-reload"]);
    Ok(removed)
}

/// A unit file, 0600: it may hold a token.
fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    mesh_ipc::paths::write_private_file(path, text.as_bytes()).with_context(|| format!("writing {}", path.display()))
}

fn launchd_domain() -> anyhow::Result<String> {
    Ok(format!("gui/{}", nix::unistd::getuid()))
}

fn remove_if_present(path: &Path) -> anyhow::Result<Option<PathBuf>> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(Some(path.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("removing {}", path.display())),
    }
}

/// Prints what an install did.
pub fn report_installed(done: &Installed) -> anyhow::Result<()> {
    if crate::output::json() {
        return crate::output::print_json(done);
    }
    outln!("wrote {}", done.file.display());
    if done.started {
        outln!("enabled and started {}", done.name);
    }
    if let Some(note) = &done.note {
        outln!("{note}");
    }
    Ok(())
}

/// Prints what an uninstall did.
pub fn report_uninstalled(service: &Service, removed: Option<PathBuf>) -> anyhow::Result<()> {
    if crate::output::json() {
        return crate::output::print_json(&serde_json::json!({ "name": service.name(), "removed": removed }));
    }
    match removed {
        Some(p) => outln!("removed {}", p.display()),
        None => outln!("no service {} was installed", service.name()),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn daemon(home: Option<&str>) -> Service {
        Service {
            kind: "daemon",
            description: "d",
            args: vec!["daemon".into(), "up".into()],
            mesh_home: home.map(|h| absolute(Path::new(h)).expect("absolute")),
            env: vec![],
        }
    }

    #[test]
    fn each_home_has_its_own_service_name() {
        assert_eq!(daemon(None).name(), "mesh-daemon");
        let (a, b, c) = (daemon(Some("/tmp/bob")), daemon(Some("/home/x/bob")), daemon(Some("/tmp/bob")));
        assert!(a.name().starts_with("mesh-daemon-bob-"), "{}", a.name());
        assert_ne!(a.name(), b.name());
        assert_eq!(a.name(), c.name());
        assert_eq!(daemon(Some("/tmp/My Home!")).name().split('-').nth(2), Some("my"));
        assert!(daemon(Some("/")).name().starts_with("mesh-daemon-"));
        assert_eq!(daemon(Some("/tmp/bob/")).name(), a.name(), "a trailing slash is the same home");
        assert_eq!(daemon(Some("/tmp/./bob")).name(), a.name());
        assert!(absolute(Path::new("/tmp/a\nExecStartPre=/bin/x")).is_err());
    }

    #[test]
    fn words_with_spaces_are_quoted() {
        assert_eq!(quote("/usr/bin/mesh"), "/usr/bin/mesh");
        assert_eq!(quote("/tmp/my home"), "\"/tmp/my home\"");
        assert_eq!(quote("a\"b"), "\"a\\\"b\"");
        assert_eq!(quote("/tmp/50%"), "/tmp/50%%");
        assert_eq!(quote_exec("/tmp/d${HOME}/cert.pem"), "\"/tmp/d$${HOME}/cert.pem\"");
    }
}
