//! `mesh members`, `mesh remove`, `mesh leave`, `mesh role`, `mesh invites` and `mesh invite revoke`.

use mesh_ipc::api::{
    InviteInfo, InvitesQuery, LeaveRequest, MemberChange, PeerInfo, PeersQuery, RemoveRequest, RevokeInviteRequest,
    RoleRequest,
};
use mesh_ipc::routes;
use mesh_proto::wire::{PeerKind, Role};

use crate::output;

#[derive(clap::Args, Debug)]
pub struct MembersArgs {
    /// The mesh (default: MESH_CONTEXT, then `mesh use`, else your only mesh)
    #[arg(long)]
    pub mesh: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct RemoveArgs {
    /// The member: a name, a key prefix (4+ hex digits) or a full key
    pub member: String,
    /// The mesh (default: MESH_CONTEXT, then `mesh use`, else your only mesh)
    #[arg(long)]
    pub mesh: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct LeaveArgs {
    /// The mesh (default: MESH_CONTEXT, then `mesh use`, else your only mesh)
    #[arg(long)]
    pub mesh: Option<String>,
    /// Only forget the mesh here, without telling its broker (when the broker is gone for good)
    #[arg(long)]
    pub forget: bool,
    /// Do not ask (needed when no one is at a terminal to answer)
    #[arg(long)]
    pub yes: bool,
}

#[derive(clap::Args, Debug)]
pub struct RoleArgs {
    /// The member: a name, a key prefix (4+ hex digits) or a full key
    pub member: String,
    /// admin, member, or owner (hands the mesh over: you become an admin)
    #[arg(value_enum)]
    pub role: RoleArg,
    /// The mesh (default: MESH_CONTEXT, then `mesh use`, else your only mesh)
    #[arg(long)]
    pub mesh: Option<String>,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum RoleArg {
    Owner,
    Admin,
    Member,
}

#[derive(clap::Args, Debug)]
pub struct InvitesArgs {
    /// The mesh (default: MESH_CONTEXT, then `mesh use`, else your only mesh)
    #[arg(long)]
    pub mesh: Option<String>,
    /// Also the invites that expired, were used up or revoked
    #[arg(long)]
    pub all: bool,
}

pub fn members(args: MembersArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    let q = PeersQuery { mesh: super::context_mesh(args.mesh)?, all_meshes: false };
    let peers: Vec<PeerInfo> = super::block_on(client.get_query(routes::PEERS, &q))??;
    let members: Vec<&PeerInfo> = peers.iter().filter(|p| p.kind == PeerKind::Member).collect();
    if output::json() {
        let listed: Vec<serde_json::Value> = members
            .iter()
            .map(|m| {
                let sessions: Vec<&PeerInfo> =
                    peers.iter().filter(|p| p.kind == PeerKind::Session && p.member == m.key).collect();
                let mut v = serde_json::to_value(m).unwrap_or_default();
                v["sessions"] = serde_json::to_value(sessions).unwrap_or_default();
                v
            })
            .collect();
        return super::print_json(&listed);
    }
    if members.is_empty() {
        outln!("no members known yet (the daemon learns the roster when it connects to the broker)");
    }
    let name_of = |key: &str| peers.iter().find(|p| p.key == key).map(|p| p.name.clone());
    // Several meshes (no context chose one): each under its name.
    let several = members.iter().any(|m| m.mesh != members[0].mesh);
    let mut shown_mesh: Option<&str> = None;
    for m in &members {
        if several && shown_mesh != Some(m.mesh.as_str()) {
            outln!("{}mesh {}:", if shown_mesh.is_some() { "\n" } else { "" }, output::clean(&m.mesh));
            shown_mesh = Some(&m.mesh);
        }
        let state = if m.online {
            "online".to_owned()
        } else {
            m.last_seen.map_or_else(|| "offline".to_owned(), |t| format!("seen {}", output::ago(t)))
        };
        let joined = m.joined_at.map(|t| format!(", joined {}", output::time(t))).unwrap_or_default();
        let invited = m
            .invited_by
            .as_deref()
            .map(|k| match name_of(k) {
                Some(name) => format!(" invited by {name} ({})", output::short(k)),
                None => format!(" invited by {}", output::short(k)),
            })
            .unwrap_or_default();
        let me = if m.is_self { "  (you)" } else { "" };
        let line =
            format!("{:<20} {}  {:<6} [{state}]{joined}{invited}{me}", m.name, output::short(&m.key), m.role.as_str());
        outln!("{}", output::clean(&line));
        for s in peers.iter().filter(|p| p.kind == PeerKind::Session && p.member == m.key && p.mesh == m.mesh) {
            let state = match (s.ended_at, s.online) {
                (Some(t), _) => format!("ended {}", output::ago(t)),
                (None, true) => "online".to_owned(),
                (None, false) => "offline".to_owned(),
            };
            outln!("{}", output::clean(&format!("  session {:<20} {}  [{state}]", s.name, output::short(&s.key))));
        }
    }
    Ok(())
}

fn print_change(change: &MemberChange, said: String) -> anyhow::Result<()> {
    if output::json() {
        return super::print_json(change);
    }
    outln!("{}", output::clean(&said));
    Ok(())
}

#[derive(clap::Subcommand, Debug)]
pub enum MeshCommand {
    /// Give every member a new mesh key now (owners and admins; a removal does it by itself). A
    /// removed member's copy of the old key opens nothing sent after it
    RotateKey {
        /// The mesh (default: MESH_CONTEXT, then `mesh use`, else your only mesh)
        #[arg(long)]
        mesh: Option<String>,
    },
    /// Delete a mesh you own, at its broker and here: every member is cut off, and its queued
    /// messages, invites and roster are gone
    Delete {
        /// The mesh (default: MESH_CONTEXT, then `mesh use`, else your only mesh)
        #[arg(long)]
        mesh: Option<String>,
        /// Do not ask (needed when no one is at a terminal to answer)
        #[arg(long)]
        yes: bool,
    },
}

pub fn mesh(cmd: MeshCommand) -> anyhow::Result<()> {
    match cmd {
        MeshCommand::Delete { mesh, yes } => {
            let client = super::client()?;
            let mesh = super::context_mesh(mesh)?;
            if !yes {
                if !super::interactive() {
                    return Err(output::fail("usage", "deleting a mesh cannot be undone; pass --yes", None));
                }
                let which = mesh.as_deref().map_or_else(|| "your mesh".to_owned(), |m| format!("mesh {m}"));
                let answer = super::prompt(&format!("delete {which} for every member? (yes/no)"), Some("no"))?;
                if !answer.is_some_and(|a| a.eq_ignore_ascii_case("yes") || a.eq_ignore_ascii_case("y")) {
                    return Err(output::fail("failed", "not deleted", None));
                }
            }
            let req = LeaveRequest { mesh, forget: false };
            let done: MemberChange = super::block_on(client.post(routes::MESHES_DELETE, &req))??;
            let said = format!(
                "deleted mesh {}: every member is cut off, and its broker holds nothing of it any more",
                done.mesh
            );
            print_change(&done, said)
        }
        MeshCommand::RotateKey { mesh } => {
            let client = super::client()?;
            let req = mesh_ipc::api::RotateKeyRequest { mesh: super::context_mesh(mesh)? };
            let done: mesh_ipc::api::KeyRotated = super::block_on(client.post(routes::MESHES_ROTATE_KEY, &req))??;
            if output::json() {
                return super::print_json(&done);
            }
            outln!(
                "mesh {} has a new key (epoch {}); every member gets it, those away when they come back",
                done.mesh,
                done.key_epoch
            );
            Ok(())
        }
    }
}

/// A member named by nothing at all is a usage error, not a lookup.
fn named(member: &str) -> anyhow::Result<()> {
    if member.trim().is_empty() {
        return Err(output::fail("usage", "name the member: a name, a key prefix (4+ hex digits) or a key", None));
    }
    Ok(())
}

pub fn remove(args: RemoveArgs) -> anyhow::Result<()> {
    named(&args.member)?;
    let client = super::client()?;
    let req = RemoveRequest { mesh: super::context_mesh(args.mesh)?, member: args.member };
    let done: MemberChange = super::block_on(client.post(routes::MEMBERS_REMOVE, &req))??;
    let epoch = done.key_epoch.map(|e| format!("; the others have a new mesh key (epoch {e})")).unwrap_or_default();
    let said = format!(
        "removed {} ({}) from mesh {}: its connections are closed, its queued messages returned to their senders{epoch}",
        done.name,
        output::short(&done.key),
        done.mesh
    );
    if let Some(warning) = done.warning.as_deref().filter(|_| !output::json()) {
        errln!("{}", output::clean(warning));
    }
    print_change(&done, said)
}

pub fn leave(args: LeaveArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    let mesh = super::context_mesh(args.mesh)?;
    if !args.yes {
        if !super::interactive() {
            return Err(output::fail(
                "usage",
                "leaving a mesh cannot be undone by you (only a new invite lets you back in); pass --yes",
                None,
            ));
        }
        let which = mesh.as_deref().map_or_else(|| "your only mesh".to_owned(), |m| format!("mesh {m}"));
        let answer = super::prompt(&format!("leave {which}? only a new invite lets you back in (yes/no)"), Some("no"))?;
        if !answer.is_some_and(|a| a.eq_ignore_ascii_case("yes") || a.eq_ignore_ascii_case("y")) {
            return Err(output::fail("failed", "not left", None));
        }
    }
    let req = LeaveRequest { mesh, forget: args.forget };
    let done: MemberChange = super::block_on(client.post(routes::MEMBERS_LEAVE, &req))??;
    let said = if done.change == "forget" {
        format!(
            "forgot mesh {} here: sends not yet accepted there are dead (received messages stay in your inbox)",
            done.mesh
        )
    } else {
        format!(
            "left mesh {}: the others are told, sends not yet accepted there are dead, and the mesh is gone from here (received messages stay in your inbox)",
            done.mesh
        )
    };
    print_change(&done, said)
}

pub fn role(args: RoleArgs) -> anyhow::Result<()> {
    named(&args.member)?;
    let client = super::client()?;
    let role = match args.role {
        RoleArg::Owner => Role::Owner,
        RoleArg::Admin => Role::Admin,
        RoleArg::Member => Role::Member,
    };
    let req = RoleRequest { mesh: super::context_mesh(args.mesh)?, member: args.member, role };
    let done: MemberChange = super::block_on(client.post(routes::MEMBERS_ROLE, &req))??;
    let said = match role {
        Role::Owner => {
            format!("{} ({}) owns mesh {} now; you are an admin", done.name, output::short(&done.key), done.mesh)
        }
        _ => format!("{} ({}) is {} of mesh {} now", done.name, output::short(&done.key), role.as_str(), done.mesh),
    };
    print_change(&done, said)
}

pub fn invites(args: InvitesArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    let q = InvitesQuery { mesh: super::context_mesh(args.mesh)? };
    let all: Vec<InviteInfo> = super::block_on(client.get_query(routes::INVITES, &q))??;
    let shown: Vec<&InviteInfo> = all.iter().filter(|i| args.all || i.state == "open").collect();
    if output::json() {
        return super::print_json(&shown);
    }
    if shown.is_empty() {
        let more = if all.is_empty() { "" } else { " (--all shows the others)" };
        outln!("no outstanding invites{more}");
    }
    for i in shown {
        let by = i.issued_by_name.clone().unwrap_or_else(|| output::short(&i.issued_by).to_owned());
        let uses = match i.max_uses {
            Some(max) => format!("{} of {max} used", i.uses),
            None => format!("{} used, no limit", i.uses),
        };
        let state = match i.state.as_str() {
            "open" => format!("expires {}", output::time(i.expires_at)),
            "revoked" => format!("revoked {}", i.revoked_at.map(output::time).unwrap_or_default()),
            "expired" => format!("expired {}", output::time(i.expires_at)),
            "issuer_not_admin" => "void: its issuer is no longer an owner or admin".to_owned(),
            other => other.replace('_', " "),
        };
        let line = format!("{}  {:<6} by {by}, {uses}, {state}", i.id, i.role.as_str());
        outln!("{}", output::clean(&line));
    }
    Ok(())
}

pub fn revoke_invite(id: String, mesh: Option<String>) -> anyhow::Result<()> {
    if id.trim().len() != 32 || !id.trim().bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(output::fail(
            "usage",
            "an invite id is 32 hex digits, as `mesh invites` lists them",
            Some("mesh invites --all".into()),
        ));
    }
    let client = super::client()?;
    let req = RevokeInviteRequest { mesh: super::context_mesh(mesh)?, id };
    let done: serde_json::Value = super::block_on(client.post(routes::INVITES_REVOKE, &req))??;
    if output::json() {
        return super::print_json(&done);
    }
    outln!(
        "revoked invite {} of mesh {}: no one joins with it any more",
        done["id"].as_str().unwrap_or_default(),
        done["mesh"].as_str().unwrap_or_default()
    );
    Ok(())
}
