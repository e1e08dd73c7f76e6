//! `mesh daemon install-service` writes a unit that systemd itself accepts.

use mesh_testkit::TestHome;

use super::*;

#[test]
fn install_service_writes_a_systemd_unit_that_verifies_and_uninstall_removes_it() {
    let home = TestHome::new(MESH);
    let xdg = tempfile::tempdir().expect("tempdir");
    let out = home
        .cmd(&["daemon", "install-service", "--no-start"])
        .env("XDG_CONFIG_HOME", xdg.path())
        .output()
        .expect("run");
    assert!(out.status.success(), "{}", home.report(&["daemon", "install-service"], &out));
    let unit = xdg.path().join("systemd/user/mesh-daemon.service");
    let text = std::fs::read_to_string(&unit).expect("unit written");
    assert!(text.contains(&format!("ExecStart={MESH} daemon up --foreground")), "{text}");
    assert!(text.contains(&format!("Environment=MESH_HOME={}", home.path().display())), "{text}");

    if let Ok(verify) = std::process::Command::new("systemd-analyze").arg("verify").arg(&unit).output() {
        let stderr = String::from_utf8_lossy(&verify.stderr);
        assert!(verify.status.success() && stderr.trim().is_empty(), "systemd-analyze verify: {stderr}");
    }

    let out = home.cmd(&["daemon", "uninstall-service"]).env("XDG_CONFIG_HOME", xdg.path()).output().expect("run");
    assert!(out.status.success(), "{}", home.report(&["daemon", "uninstall-service"], &out));
    assert!(!unit.exists());
}
