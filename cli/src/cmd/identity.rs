//! `mesh init`.

use anyhow::Context;
use mesh_daemon::identity;

#[derive(clap::Args, Debug)]
pub struct InitArgs {
    /// Your default display name in meshes you create or join (default: your login name; asked on a
    /// terminal)
    #[arg(long)]
    pub name: Option<String>,
}

pub fn init(args: InitArgs) -> anyhow::Result<()> {
    let home = super::home()?;
    home.ensure_dirs().context("creating mesh's directories")?;
    let existing = identity::load(&home)?;
    let asked = match args.name {
        Some(n) => Some(n),
        None if existing.is_none() && super::interactive() => {
            super::prompt("your display name", Some(&identity::default_name()))?
        }
        None => None,
    };
    let asked = asked.map(|n| mesh_proto::names::normalize(&n));
    let (member, created) = match (existing, asked) {
        (None, name) => (identity::create(&home, &name.unwrap_or_else(identity::default_name))?, true),
        (Some(mut m), Some(name)) if name != m.name => {
            mesh_proto::names::validate_display(&name)?;
            m.name = name;
            identity::save(&home, &m)?;
            if !crate::output::json() {
                errln!(
                    "note: this is your default name for meshes you create or join from now on; \
                     `mesh rename NAME --mesh MESH` changes it in a mesh you are already in"
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
