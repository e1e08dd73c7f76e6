//! `mesh group join|leave|list`.

use mesh_ipc::api::{GroupChange, GroupInfo};
use mesh_ipc::routes;

#[derive(clap::Subcommand, Debug)]
pub enum GroupCommand {
    /// Join @GROUP: messages sent to it reach you (or the session this runs in)
    Join(GroupArgs),
    /// Leave @GROUP
    Leave(GroupArgs),
    /// Your groups
    List,
}

#[derive(clap::Args, Debug)]
pub struct GroupArgs {
    /// The group, with or without the @
    pub group: String,
    /// The mesh (default: MESH_CONTEXT, then `mesh use`, else your only mesh)
    #[arg(long)]
    pub mesh: Option<String>,
}

pub fn run(cmd: GroupCommand) -> anyhow::Result<()> {
    let client = super::client()?;
    let groups: Vec<GroupInfo> = match cmd {
        GroupCommand::Join(a) => {
            let body = GroupChange { group: a.group, mesh: super::context_mesh(a.mesh)? };
            super::block_on(client.post(routes::GROUPS_JOIN, &body))??
        }
        GroupCommand::Leave(a) => {
            let body = GroupChange { group: a.group, mesh: super::context_mesh(a.mesh)? };
            super::block_on(client.post(routes::GROUPS_LEAVE, &body))??
        }
        GroupCommand::List => super::block_on(client.get(routes::GROUPS))??,
    };
    if crate::output::json() {
        return super::print_json(&groups);
    }
    if groups.is_empty() {
        outln!("in no groups");
    }
    for g in &groups {
        let state = match (g.joined, g.synced) {
            (true, true) => "joined",
            (true, false) => "joining (the broker has not confirmed yet)",
            (false, _) => "leaving",
        };
        outln!("{}", crate::output::clean(&format!("@{:<20} mesh {:<16} {state}", g.group, g.mesh)));
    }
    Ok(())
}
