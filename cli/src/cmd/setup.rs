//! `mesh setup claude|codex`: adds `mesh mcp` and the agent hooks to an agent's configuration files,
//! or takes them out again (`--remove`).
//!
//! The files are edited in place, keeping everything else as it was, byte for byte (JSON through a
//! concrete syntax tree, TOML through `toml_edit`): only what mesh adds changes. Running it twice
//! changes nothing the second time. What mesh added is recognised by its commands (`… mcp`,
//! `… agent-hook …`), so `--remove` takes out exactly that. Before a file is changed the old one is
//! kept as `<file>.mesh-backup`; `--print` shows the change and writes nothing.

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use jsonc_parser::ParseOptions;
use jsonc_parser::cst::{CstInputValue, CstObject, CstRootNode};
use serde_json::Value;

use crate::output;

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum Agent {
    Claude,
    Codex,
}

#[derive(clap::Args, Debug)]
pub struct SetupArgs {
    /// The agent to set up
    #[arg(value_enum)]
    pub agent: Agent,
    /// The project whose configuration to change (default: this directory)
    #[arg(long, conflicts_with = "user")]
    pub project: Option<PathBuf>,
    /// Your own configuration, for every project, instead of one project's
    #[arg(long)]
    pub user: bool,
    /// Show the change and write nothing
    #[arg(long)]
    pub print: bool,
    /// Take out what mesh added, and nothing else
    #[arg(long)]
    pub remove: bool,
}

/// One file's change.
struct Change {
    path: PathBuf,
    before: Option<String>,
    after: String,
}

pub fn run(args: SetupArgs) -> anyhow::Result<()> {
    let mesh = mesh_command()?;
    let project = args.project.clone();
    // A file of the user's own configuration, under the home directory.
    let base = |rel: &str| -> anyhow::Result<PathBuf> { Ok(dirs::home_dir().context("no home directory")?.join(rel)) };
    let mut changes = Vec::new();
    match args.agent {
        Agent::Claude => {
            // MCP servers: a project's `.mcp.json`, or the user's `~/.claude.json`.
            let servers = if args.user { base(".claude.json")? } else { project_file(&project, ".mcp.json")? };
            changes.push(edit(&servers, |t| claude_mcp(t, &mesh, args.remove))?);
            let settings = if args.user {
                base(".claude/settings.json")?
            } else {
                project_file(&project, ".claude/settings.json")?
            };
            changes.push(edit(&settings, |t| claude_hooks(t, &mesh, args.remove))?);
        }
        Agent::Codex => {
            let config = if args.user {
                match std::env::var_os("CODEX_HOME") {
                    Some(h) => PathBuf::from(h).join("config.toml"),
                    None => base(".codex/config.toml")?,
                }
            } else {
                project_file(&project, ".codex/config.toml")?
            };
            changes.push(edit(&config, |t| codex(t, &mesh, args.remove))?);
        }
    }
    report(&changes, args.print)
}

/// `rel` under the project directory (default: this one).
fn project_file(project: &Option<PathBuf>, rel: &str) -> anyhow::Result<PathBuf> {
    let dir = match project {
        Some(d) => d.clone(),
        None => std::env::current_dir().context("the working directory")?,
    };
    Ok(dir.join(rel))
}

/// The `mesh` the agent should run: this very executable, by its absolute path (an agent started from
/// a desktop may not have mesh's directory on its `PATH`).
fn mesh_command() -> anyhow::Result<String> {
    let exe = std::env::current_exe().context("finding the mesh executable")?;
    let exe = exe.to_str().context("the mesh executable's path is not UTF-8")?.to_owned();
    if exe.chars().any(|c| c.is_control() || c == '"' || c == '\'' || c == '\\') {
        bail!("the mesh executable's path {exe:?} cannot be written into a command line safely");
    }
    Ok(exe)
}

/// A command line running `mesh` with `args` (the path quoted when it holds spaces).
fn command_line(mesh: &str, args: &str) -> String {
    if mesh.contains(' ') { format!("'{mesh}' {args}") } else { format!("{mesh} {args}") }
}

/// Whether a hook command is one mesh added.
fn ours(command: &str) -> bool {
    command.contains(" agent-hook ")
}

fn edit(path: &Path, change: impl FnOnce(&str) -> anyhow::Result<String>) -> anyhow::Result<Change> {
    let before = match std::fs::read_to_string(path) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(anyhow::Error::new(e).context(format!("reading {}", path.display()))),
    };
    let after = change(before.as_deref().unwrap_or("")).with_context(|| format!("editing {}", path.display()))?;
    Ok(Change { path: path.to_owned(), before, after })
}

fn report(changes: &[Change], print: bool) -> anyhow::Result<()> {
    let mut done = Vec::new();
    for c in changes {
        let old = c.before.as_deref().unwrap_or("");
        let changed = old != c.after && !(c.before.is_none() && c.after.is_empty());
        if print {
            if changed {
                let diff = similar::TextDiff::from_lines(old, &c.after);
                let shown = c.path.display().to_string();
                let text =
                    diff.unified_diff().header(&format!("{shown} (now)"), &format!("{shown} (after)")).to_string();
                output::write_stdout(format_args!("{text}"));
            }
            done.push(serde_json::json!({ "file": c.path, "changed": changed, "written": false }));
            continue;
        }
        let mut backup = None;
        if changed {
            if let Some(dir) = c.path.parent() {
                std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
            }
            if let Some(old) = &c.before {
                let b = PathBuf::from(format!("{}.mesh-backup", c.path.display()));
                std::fs::write(&b, old).with_context(|| format!("writing the backup {}", b.display()))?;
                backup = Some(b);
            }
            write_keeping_mode(&c.path, &c.after)?;
        }
        if !output::json() {
            match (&backup, changed) {
                (_, false) => outln!("{}: nothing to change", c.path.display()),
                (Some(b), true) => outln!("updated {} (the old file is {})", c.path.display(), b.display()),
                (None, true) => outln!("wrote {}", c.path.display()),
            }
        }
        done.push(serde_json::json!({ "file": c.path, "changed": changed, "written": changed, "backup": backup }));
    }
    if output::json() {
        return super::print_json(&done);
    }
    Ok(())
}

/// Writes `text` to `path` through a temporary file, keeping the old file's permissions.
fn write_keeping_mode(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode() & 0o777).unwrap_or(0o644);
    let tmp = PathBuf::from(format!("{}.mesh-tmp", path.display()));
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))?;
    std::fs::rename(&tmp, path).with_context(|| format!("replacing {}", path.display()))?;
    Ok(())
}

// ---------------------------------------------------------------------------------------------------
// Claude Code

fn parse_json(text: &str) -> anyhow::Result<CstRootNode> {
    let text = if text.trim().is_empty() { "{}\n" } else { text };
    CstRootNode::parse(text, &ParseOptions::default()).map_err(|e| anyhow::anyhow!("not JSON: {e}"))
}

fn value_of(node: &impl std::fmt::Display) -> Value {
    jsonc_parser::parse_to_serde_value(&node.to_string(), &ParseOptions::default())
        .ok()
        .flatten()
        .unwrap_or(Value::Null)
}

/// `mcpServers.mesh = {"command": MESH, "args": ["mcp"]}`.
fn claude_mcp(text: &str, mesh: &str, remove: bool) -> anyhow::Result<String> {
    if remove && text.trim().is_empty() {
        return Ok(String::new());
    }
    let root = parse_json(text)?;
    let top = root.object_value_or_set();
    let existing = top.object_value("mcpServers").and_then(|s| s.get("mesh"));
    let is_ours = |v: &Value| {
        v["args"].get(0).and_then(Value::as_str) == Some("mcp")
            && v["command"].as_str().is_some_and(|c| c.ends_with("mesh"))
    };
    let want = serde_json::json!({ "command": mesh, "args": ["mcp"] });
    if let Some(prop) = &existing {
        let v = prop.value().map(|n| value_of(&n)).unwrap_or(Value::Null);
        if !is_ours(&v) {
            bail!("an MCP server named \"mesh\" is there already, and mesh did not add it; leaving it");
        }
        if remove {
            let servers = top.object_value("mcpServers");
            prop.clone().remove();
            drop_if_empty(&top, "mcpServers", servers);
        } else if v != want {
            prop.set_value(input(&want));
        }
    } else if !remove {
        top.object_value_or_set("mcpServers").append("mesh", input(&want));
    }
    Ok(root.to_string())
}

/// The hooks: `Stop` (the wait, woken with asyncRewake), `SessionStart` and `UserPromptSubmit`.
fn claude_hooks(text: &str, mesh: &str, remove: bool) -> anyhow::Result<String> {
    if remove && text.trim().is_empty() {
        return Ok(String::new());
    }
    let root = parse_json(text)?;
    let top = root.object_value_or_set();
    let wanted = [
        (
            "Stop",
            serde_json::json!({
                "type": "command",
                "command": command_line(mesh, "agent-hook wait --timeout 10m"),
                "asyncRewake": true,
                "timeout": 660,
            }),
        ),
        ("SessionStart", serde_json::json!({ "type": "command", "command": command_line(mesh, "agent-hook context") })),
        (
            "UserPromptSubmit",
            serde_json::json!({ "type": "command", "command": command_line(mesh, "agent-hook context") }),
        ),
    ];
    for (event, handler) in wanted {
        let hooks = top.object_value("hooks");
        let groups = hooks.as_ref().and_then(|h| h.array_value(event));
        // Ours: a group whose every handler is a mesh agent-hook command.
        let mine: Vec<_> = groups
            .iter()
            .flat_map(|g| g.elements())
            .filter(|g| {
                let v = value_of(g);
                v["hooks"]
                    .as_array()
                    .is_some_and(|hs| !hs.is_empty() && hs.iter().all(|h| h["command"].as_str().is_some_and(ours)))
            })
            .collect();
        let exact = serde_json::json!({ "hooks": [handler] });
        if !remove && mine.len() == 1 && value_of(&mine[0]) == exact {
            continue;
        }
        for g in mine {
            g.remove();
        }
        if remove {
            if let Some(h) = &hooks {
                if let Some(arr) = h.array_value(event)
                    && arr.elements().is_empty()
                    && let Some(p) = h.get(event)
                {
                    p.remove();
                }
                drop_if_empty(&top, "hooks", top.object_value("hooks"));
            }
            continue;
        }
        top.object_value_or_set("hooks").array_value_or_set(event).append(input(&exact));
    }
    Ok(root.to_string())
}

/// Takes out `name` when it is an object left empty.
fn drop_if_empty(top: &CstObject, name: &str, value: Option<CstObject>) {
    if value.is_some_and(|v| v.properties().is_empty())
        && let Some(p) = top.get(name)
    {
        p.remove();
    }
}

/// `v` for the syntax tree, its keys in the order people write them (`type` and `command` first).
fn input(v: &Value) -> CstInputValue {
    const FIRST: [&str; 3] = ["type", "command", "args"];
    match v {
        Value::Null => CstInputValue::Null,
        Value::Bool(b) => CstInputValue::Bool(*b),
        Value::Number(n) => CstInputValue::Number(n.to_string()),
        Value::String(s) => CstInputValue::String(s.clone()),
        Value::Array(a) => CstInputValue::Array(a.iter().map(input).collect()),
        Value::Object(o) => {
            let mut keys: Vec<&String> = o.keys().collect();
            keys.sort_by_key(|k| FIRST.iter().position(|f| f == k).unwrap_or(FIRST.len()));
            CstInputValue::Object(keys.into_iter().map(|k| (k.clone(), input(&o[k]))).collect())
        }
    }
}

// ---------------------------------------------------------------------------------------------------
// Codex

/// `[mcp_servers.mesh]` and a `Stop` hook running `mesh agent-hook codex-stop`.
fn codex(text: &str, mesh: &str, remove: bool) -> anyhow::Result<String> {
    use toml_edit::{ArrayOfTables, DocumentMut, Item, Table, value};
    let mut doc: DocumentMut = text.parse().map_err(|e| anyhow::anyhow!("not TOML: {e}"))?;
    // The MCP server.
    let existing = doc.get("mcp_servers").and_then(|s| s.get("mesh"));
    if let Some(server) = existing {
        let theirs = server.get("command").and_then(Item::as_str).is_none_or(|c| !c.ends_with("mesh"))
            || server.get("args").and_then(Item::as_array).and_then(|a| a.get(0)).and_then(|v| v.as_str())
                != Some("mcp");
        if theirs {
            bail!("an MCP server named \"mesh\" is there already, and mesh did not add it; leaving it");
        }
    }
    let servers = doc.get_mut("mcp_servers").and_then(Item::as_table_mut);
    match (remove, servers) {
        (true, Some(servers)) => {
            servers.remove("mesh");
            if servers.is_empty() {
                doc.remove("mcp_servers");
            }
        }
        (true, None) => {}
        (false, servers) => {
            let servers = match servers {
                Some(s) => s,
                None => {
                    let mut t = Table::new();
                    t.set_implicit(true);
                    doc.insert("mcp_servers", Item::Table(t));
                    doc["mcp_servers"].as_table_mut().expect("a table")
                }
            };
            let same = servers.get("mesh").and_then(|s| s.get("command")).and_then(Item::as_str) == Some(mesh);
            if !same {
                let mut t = Table::new();
                t.insert("command", value(mesh));
                let mut args = toml_edit::Array::new();
                args.push("mcp");
                t.insert("args", value(args));
                servers.insert("mesh", Item::Table(t));
            }
        }
    }
    // The Stop hook: `[[hooks.Stop]]` entries whose every handler is ours are mesh's.
    let command = command_line(mesh, "agent-hook codex-stop");
    let is_mine = |entry: &Table| {
        entry.get("hooks").and_then(Item::as_array_of_tables).is_some_and(|hs| {
            !hs.is_empty() && hs.iter().all(|h| h.get("command").and_then(Item::as_str).is_some_and(ours))
        })
    };
    let already = doc
        .get("hooks")
        .and_then(|h| h.get("Stop"))
        .and_then(Item::as_array_of_tables)
        .map(|stops| {
            let mine: Vec<_> = stops.iter().filter(|e| is_mine(e)).collect();
            mine.len() == 1
                && mine[0].get("hooks").and_then(Item::as_array_of_tables).is_some_and(|hs| {
                    hs.len() == 1 && hs.get(0).and_then(|h| h.get("command")).and_then(Item::as_str) == Some(&command)
                })
        })
        .unwrap_or(false);
    if !already || remove {
        if let Some(stops) = doc.get_mut("hooks").and_then(|h| h.get_mut("Stop")).and_then(Item::as_array_of_tables_mut)
        {
            stops.retain(|e| !is_mine(e));
        }
        if remove {
            let hooks = doc.get_mut("hooks").and_then(Item::as_table_mut);
            if let Some(hooks) = hooks {
                if hooks.get("Stop").and_then(Item::as_array_of_tables).is_some_and(ArrayOfTables::is_empty) {
                    hooks.remove("Stop");
                }
                if hooks.is_empty() {
                    doc.remove("hooks");
                }
            }
        } else {
            let hooks = doc.entry("hooks").or_insert_with(|| {
                let mut t = Table::new();
                t.set_implicit(true);
                Item::Table(t)
            });
            let hooks = hooks.as_table_mut().context("`hooks` in config.toml is not a table")?;
            let stops = hooks.entry("Stop").or_insert_with(|| Item::ArrayOfTables(ArrayOfTables::new()));
            let stops = stops.as_array_of_tables_mut().context("`hooks.Stop` is not an array of tables")?;
            let mut handler = Table::new();
            handler.insert("type", value("command"));
            handler.insert("command", value(command.as_str()));
            let mut handlers = ArrayOfTables::new();
            handlers.push(handler);
            let mut entry = Table::new();
            entry.insert("hooks", Item::ArrayOfTables(handlers));
            stops.push(entry);
        }
    }
    Ok(doc.to_string())
}
