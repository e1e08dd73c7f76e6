//! `mesh setup claude|codex` on configuration files that already hold other servers and hooks: only
//! what mesh adds changes, twice is once, `--print` writes nothing, `--remove` gives the file back.

use super::*;

const MCP_JSON: &str =
    "{\n\t\"mcpServers\": {\n\t\t\"github\":   { \"command\": \"gh-mcp\", \"args\": [\"serve\"] }\n\t}\n}\n";
const SETTINGS: &str = r#"{
  "permissions": {"allow": ["Bash(ls)"]},
  "hooks": {
    "Stop": [
      {"hooks": [{"type": "command", "command": "notify-send done"}]}
    ]
  }
}
"#;
const CODEX: &str = "# my codex config\nmodel = \"o5\"   # favourite\n\n[mcp_servers.github]\ncommand = \"gh-mcp\"\nargs = [\"serve\"]\n";

fn read(p: &std::path::Path) -> String {
    std::fs::read_to_string(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

#[test]
fn claude_s_files_keep_everything_else_and_remove_gives_them_back() {
    let home = TestHome::new(MESH);
    let project = tempfile::tempdir().expect("project");
    let (mcp, settings) = (project.path().join(".mcp.json"), project.path().join(".claude/settings.json"));
    std::fs::create_dir_all(settings.parent().expect("dir")).expect("mkdir");
    std::fs::write(&mcp, MCP_JSON).expect("write");
    std::fs::write(&settings, SETTINGS).expect("write");
    let dir = project.path().to_str().expect("utf-8");

    // --print shows the change and writes nothing.
    let shown = home.ok(&["setup", "claude", "--project", dir, "--print"]);
    assert!(shown.contains("+") && shown.contains("agent-hook wait"), "{shown}");
    assert_eq!((read(&mcp), read(&settings)), (MCP_JSON.to_owned(), SETTINGS.to_owned()));

    home.ok(&["setup", "claude", "--project", dir]);
    let (m, s) = (read(&mcp), read(&settings));
    // Everything that was there is still there, as it was written.
    assert!(m.contains("\"github\":   { \"command\": \"gh-mcp\", \"args\": [\"serve\"] }"), "{m}");
    assert!(s.contains("\"permissions\": {\"allow\": [\"Bash(ls)\"]}"), "{s}");
    assert!(s.contains("{\"hooks\": [{\"type\": \"command\", \"command\": \"notify-send done\"}]}"), "{s}");
    let m: serde_json::Value = serde_json::from_str(&m).expect("JSON");
    let s: serde_json::Value = serde_json::from_str(&s).expect("JSON");
    assert_eq!(m["mcpServers"]["mesh"]["args"], serde_json::json!(["mcp"]));
    assert!(m["mcpServers"]["mesh"]["command"].as_str().expect("command").ends_with("mesh"));
    assert_eq!(s["hooks"]["Stop"].as_array().expect("Stop").len(), 2);
    assert_eq!(s["hooks"]["Stop"][1]["hooks"][0]["asyncRewake"], true);
    assert!(
        s["hooks"]["UserPromptSubmit"][0]["hooks"][0]["command"].as_str().expect("cmd").ends_with("agent-hook context")
    );
    assert_eq!(read(&project.path().join(".mcp.json.mesh-backup")), MCP_JSON, "the old file is kept");

    // Twice is once.
    let (m1, s1) = (read(&mcp), read(&settings));
    home.ok(&["setup", "claude", "--project", dir]);
    assert_eq!((read(&mcp), read(&settings)), (m1, s1));

    // --remove takes out exactly what mesh added.
    home.ok(&["setup", "claude", "--project", dir, "--remove"]);
    assert_eq!((read(&mcp), read(&settings)), (MCP_JSON.to_owned(), SETTINGS.to_owned()));
}

#[test]
fn codex_s_config_keeps_everything_else_and_remove_gives_it_back() {
    let home = TestHome::new(MESH);
    let project = tempfile::tempdir().expect("project");
    let config = project.path().join(".codex/config.toml");
    std::fs::create_dir_all(config.parent().expect("dir")).expect("mkdir");
    std::fs::write(&config, CODEX).expect("write");
    let dir = project.path().to_str().expect("utf-8");
    home.ok(&["setup", "codex", "--project", dir]);
    let after = read(&config);
    assert!(after.starts_with(CODEX), "the file's own text is kept as it was:\n{after}");
    assert!(after.contains("[mcp_servers.mesh]") && after.contains("agent-hook codex-stop"), "{after}");
    assert!(after.contains("[[hooks.Stop.hooks]]") && after.contains("type = \"command\""), "{after}");
    home.ok(&["setup", "codex", "--project", dir]);
    assert_eq!(read(&config), after, "twice is once");
    home.ok(&["setup", "codex", "--project", dir, "--remove"]);
    assert_eq!(read(&config), CODEX);
}

#[test]
fn a_server_named_mesh_that_mesh_did_not_add_is_left_alone() {
    let home = TestHome::new(MESH);
    let project = tempfile::tempdir().expect("project");
    let mcp = project.path().join(".mcp.json");
    let theirs = "{\"mcpServers\": {\"mesh\": {\"command\": \"something-else\"}}}\n";
    std::fs::write(&mcp, theirs).expect("write");
    let err = home.fails(&["setup", "claude", "--project", project.path().to_str().expect("utf-8")], 1);
    assert!(err.contains("mesh did not add it"), "{err}");
    assert_eq!(read(&mcp), theirs);
}

#[test]
fn user_setup_writes_under_the_home_directory() {
    let home = TestHome::new(MESH);
    let user = tempfile::tempdir().expect("home");
    let out = home.cmd(&["setup", "claude", "--user"]).env("HOME", user.path()).output().expect("setup");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let servers: serde_json::Value = serde_json::from_str(&read(&user.path().join(".claude.json"))).expect("JSON");
    assert_eq!(servers["mcpServers"]["mesh"]["args"][0], "mcp");
    assert!(read(&user.path().join(".claude/settings.json")).contains("agent-hook wait"));
}
