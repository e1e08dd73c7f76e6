//! `mesh init`.

use anyhow::Context;
use mesh_daemon::identity;

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Display name other members see (default: your login name)
    #[arg(long)]
    pub name: Option<String>,
}

pub fn init(args: InitArgs) -> anyhow::Result<()> {
    let home = super::home()?;
    home.ensure_dirs().context("creating mesh's directories")?;
    let existing = identity::load(&home)?;
    let (member, created) = match (existing, args.name) {
        (None, name) => (identity::create(&home, &name.unwrap_or_else(identity::default_name))?, true),
        (Some(mut m), Some(name)) if name != m.name => {
            mesh_proto::names::validate_display(&name)?;
            m.name = name;
            identity::save(&home, &m)?;
            if mesh_daemon::lifecycle::is_running(&home) {
                errln!(
                    "note: restart the daemon for the new name to reach your meshes (`mesh daemon down && mesh daemon up`)"
                );
            }
            (m, false)
        }
        (Some(m), _) => (m, false),
    };
    if crate::output::json() {
        return super::print_json(&serde_json::json!({
            "key": member.identity.key().to_string(),
            "name": member.name,
            "created": created,
            "file": home.identity_path(),
        }));
    }
    let verb = if created { "created" } else { "identity" };
    outln!("{verb}: {} ({})", member.name, member.identity.key());
    outln!("keys:   {} (mode 0600)", home.identity_path().display());
    Ok(())
}
