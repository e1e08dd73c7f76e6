//! `mesh create`, `invite`, `join`, `meshes`, `peers`.

use mesh_ipc::api::{
    CreateInviteRequest, CreateMeshRequest, InviteResponse, JoinMeshRequest, MeshInfo, PeerInfo, PeersQuery,
};
use mesh_ipc::routes;
use mesh_proto::wire::Role;

use crate::output;

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The mesh's name
    pub name: String,
    /// The broker, e.g. ws://broker.example:7777
    #[arg(long)]
    pub broker: String,
    /// The broker's create token, if it requires one
    #[arg(long, env = "MESH_BROKER_CREATE_TOKEN", hide_env_values = true)]
    pub create_token: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct InviteArgs {
    /// The mesh (needed when you are in more than one)
    #[arg(long)]
    pub mesh: Option<String>,
    /// How long the token is valid, e.g. 10m, 24h, 7d
    #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
    pub expires: std::time::Duration,
    /// How many joins it allows (0: any number until it expires)
    #[arg(long, default_value_t = 1)]
    pub uses: u32,
    /// Role of whoever joins with it
    #[arg(long, value_enum, default_value_t = InviteRole::Member)]
    pub role: InviteRole,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug)]
pub enum InviteRole {
    Member,
    Admin,
}

#[derive(clap::Args, Debug)]
pub struct JoinArgs {
    /// The invite token (mesh-invite-v1.…)
    pub token: String,
    /// A local name for the mesh (default: the inviter's name for it)
    #[arg(long)]
    pub name: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct PeersArgs {
    #[arg(long)]
    pub mesh: Option<String>,
}

fn print_mesh(m: &MeshInfo) {
    let embedded = if m.embedded { ", embedded broker" } else { "" };
    outln!("{}  {}  {} via {}{embedded}", m.name, m.id, m.role.as_str(), m.broker);
}

pub fn create(args: CreateArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    let req = CreateMeshRequest { name: args.name, broker: args.broker, create_token: args.create_token };
    let mesh: MeshInfo = super::block_on(client.post(routes::MESHES, &req))??;
    if crate::output::json() {
        return super::print_json(&mesh);
    }
    out!("created mesh ");
    print_mesh(&mesh);
    outln!("invite someone with: mesh invite --mesh {}", mesh.name);
    Ok(())
}

pub fn invite(args: InviteArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    let req = CreateInviteRequest {
        mesh: args.mesh,
        expires_in_secs: Some(args.expires.as_secs().max(1)),
        max_uses: Some(args.uses),
        role: Some(match args.role {
            InviteRole::Member => Role::Member,
            InviteRole::Admin => Role::Admin,
        }),
    };
    let invite: InviteResponse = super::block_on(client.post(routes::INVITES, &req))??;
    if crate::output::json() {
        return super::print_json(&invite);
    }
    outln!("{}", invite.token);
    let uses = invite.max_uses.map_or_else(|| "any number of".to_owned(), |n| n.to_string());
    errln!(
        "invite to {} ({} role) for {uses} join(s), valid until {}; the token is a secret: it carries the mesh key",
        invite.mesh,
        invite.role.as_str(),
        output::time(invite.expires_at)
    );
    errln!("join with: mesh join <token>");
    Ok(())
}

pub fn join(args: JoinArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    let req = JoinMeshRequest { token: args.token, name: args.name };
    let mesh: MeshInfo = super::block_on(client.post(routes::MESHES_JOIN, &req))??;
    if crate::output::json() {
        return super::print_json(&mesh);
    }
    out!("joined mesh ");
    print_mesh(&mesh);
    Ok(())
}

pub fn list() -> anyhow::Result<()> {
    let client = super::client()?;
    let meshes: Vec<MeshInfo> = super::block_on(client.get(routes::MESHES))??;
    if crate::output::json() {
        return super::print_json(&meshes);
    }
    if meshes.is_empty() {
        outln!("no meshes; create one with `mesh create NAME --broker URL` or join with `mesh join TOKEN`");
    }
    for m in &meshes {
        print_mesh(m);
    }
    Ok(())
}

pub fn peers(args: PeersArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    let peers: Vec<PeerInfo> = super::block_on(client.get_query(routes::PEERS, &PeersQuery { mesh: args.mesh }))??;
    if crate::output::json() {
        return super::print_json(&peers);
    }
    if peers.is_empty() {
        outln!("no peers known yet (the daemon learns the roster when it connects to the broker)");
    }
    for p in &peers {
        let state = if p.online {
            "online".to_owned()
        } else {
            p.last_seen.map_or_else(|| "offline".to_owned(), |t| format!("offline, seen {}", output::ago(t)))
        };
        let me = if p.is_self { "  (you)" } else { "" };
        outln!(
            "{:<20} {:<8} {:<7} {}  mesh {}  [{state}]{me}",
            p.name,
            p.kind.as_str(),
            p.role.as_str(),
            p.key,
            p.mesh
        );
    }
    Ok(())
}
