//! `mesh create`, `invite`, `join`, `meshes`, `use`, `rename`, `limits`, `peers`.

use mesh_ipc::api::{
    ApiErrorCode, Context, CreateInviteRequest, CreateMeshRequest, InviteResponse, JoinMeshRequest, LimitsQuery,
    MeshInfo, MeshLimitsInfo, PeerInfo, PeersQuery, RenameRequest, RepinRequest, RepinResponse, SetLimitsRequest,
    Transport,
};
use mesh_ipc::routes;
use mesh_proto::wire::Role;

use crate::output;

#[derive(clap::Args, Debug)]
pub struct CreateArgs {
    /// The mesh's name
    pub name: String,
    /// The broker, e.g. wss://broker.example:7777; several replicas' addresses, comma-separated, are
    /// tried in order
    #[arg(long)]
    pub broker: String,
    /// The SHA-256 of a self-signed broker's certificate (`mesh broker serve` prints it), checked
    /// instead of certificate authorities, now and by everyone you invite. Without it, a terminal
    /// shows an unknown certificate and asks
    #[arg(long, value_name = "SHA256", value_parser = parse_pin)]
    pub pin: Option<String>,
    /// Allow plain ws:// to another machine (metadata visible on the network)
    #[arg(long)]
    pub insecure: bool,
    /// The broker's create token, if it requires one
    #[arg(long, env = "MESH_BROKER_CREATE_TOKEN", hide_env_values = true)]
    pub create_token: Option<String>,
    /// Your display name in this mesh (default: your identity's name, see `mesh init`)
    #[arg(long = "name")]
    pub display_name: Option<String>,
}

#[derive(clap::Args, Debug)]
#[command(args_conflicts_with_subcommands = true)]
pub struct InviteArgs {
    #[command(subcommand)]
    pub action: Option<InviteAction>,
    /// The mesh (default: MESH_CONTEXT, then `mesh use`, else your only mesh)
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

#[derive(clap::Subcommand, Debug)]
pub enum InviteAction {
    /// Revoke an invite: no one joins with it any more (ids: `mesh invites`)
    Revoke {
        /// The invite's id (32 hex digits)
        id: String,
        /// The mesh (default: MESH_CONTEXT, then `mesh use`, else your only mesh)
        #[arg(long)]
        mesh: Option<String>,
    },
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
    /// Your display name in this mesh (default: your identity's name; asked on a terminal). When it is
    /// taken, a terminal asks for another; otherwise NAME-2, NAME-3, … is taken and said
    #[arg(long = "name")]
    pub display_name: Option<String>,
    /// A local name for the mesh itself (default: the inviter's name for it)
    #[arg(long)]
    pub mesh_name: Option<String>,
    /// Allow the invite's broker on plain ws:// to another machine (metadata visible on the network)
    #[arg(long)]
    pub insecure: bool,
    /// Reach the mesh through this broker address instead of the invite's (an internal name, one
    /// replica); several, comma-separated, are tried in order
    #[arg(long, value_name = "URL[,URL…]")]
    pub broker: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct RepinArgs {
    /// The mesh (default: MESH_CONTEXT, then `mesh use`, else your only mesh)
    #[arg(long)]
    pub mesh: Option<String>,
    /// The certificate to pin (`sha256:…`, as the broker's operator gives it); the broker must be
    /// presenting it. Without it, a terminal shows the certificate presented and asks
    #[arg(long, value_name = "SHA256", value_parser = parse_pin, conflicts_with = "unpin")]
    pub pin: Option<String>,
    /// Drop the mesh's pin: certificate authorities this machine trusts verify the broker from now
    /// on (they must vouch for the certificate it presents now)
    #[arg(long)]
    pub unpin: bool,
}

/// A pin as typed (`sha256:` and 64 hex digits; upper case, colons and no prefix accepted), written
/// the one way.
fn parse_pin(typed: &str) -> Result<String, String> {
    typed.parse::<mesh_proto::pin::CertPin>().map(|p| p.to_string()).map_err(|_| {
        "expected sha256: and 64 hex digits (colons and upper case accepted), as `mesh broker serve` prints it"
            .to_owned()
    })
}

#[derive(clap::Args, Debug)]
pub struct RenameArgs {
    /// Your new display name
    pub name: String,
    /// The mesh to be renamed in (default: the context, or your only mesh)
    #[arg(long)]
    pub mesh: Option<String>,
}

#[derive(clap::Args, Debug)]
pub struct LimitsArgs {
    /// The mesh (default: the context, or your only mesh)
    #[arg(long)]
    pub mesh: Option<String>,
    /// Sessions one member may have that have not ended
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub sessions_per_member: Option<u32>,
    /// Connections one member may hold at once, its sessions' included
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections_per_member: Option<u32>,
    /// Connections the mesh may hold at once (members always get in; sessions wait)
    #[arg(long, value_parser = clap::value_parser!(u32).range(1..))]
    pub connections: Option<u32>,
    /// Return every limit to the broker's value first
    #[arg(long)]
    pub reset: bool,
}

#[derive(clap::Args, Debug)]
pub struct UseArgs {
    /// The mesh that commands mean when they do not say (omit to show the current one)
    pub mesh: Option<String>,
    /// Forget the context: commands search every mesh again
    #[arg(long, conflicts_with = "mesh")]
    pub clear: bool,
}

#[derive(clap::Args, Debug)]
pub struct PeersArgs {
    /// Only this mesh (default: the context, `mesh use`, else every mesh)
    #[arg(long)]
    pub mesh: Option<String>,
    /// Every mesh, whatever the context
    #[arg(long, conflicts_with = "mesh")]
    pub all_meshes: bool,
}

fn print_mesh(m: &MeshInfo) {
    let embedded = if m.embedded { ", embedded broker".to_owned() } else { transport_note(m.transport) };
    let context = if m.context { "  (context: `mesh use`)" } else { "" };
    let line =
        format!("{}  {}  {} as {:?} via {}{embedded}{context}", m.name, m.id, m.role.as_str(), m.my_name, m.broker);
    outln!("{}", output::clean(&line));
}

/// What a listing says of a mesh's transport: nothing for loopback.
pub fn transport_note(t: Transport) -> String {
    match t {
        Transport::Loopback => String::new(),
        other => format!(" ({})", other.as_str()),
    }
}

pub fn create(args: CreateArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    let mut req = CreateMeshRequest {
        name: args.name,
        broker: args.broker,
        create_token: args.create_token,
        display_name: args.display_name,
        pin: args.pin,
        insecure: args.insecure,
    };
    let mesh: MeshInfo = loop {
        match super::block_on(client.post::<_, MeshInfo>(routes::MESHES, &req))? {
            Ok(mesh) => break mesh,
            Err(e) if req.pin.is_none() && e.code() == Some(ApiErrorCode::CertificateUntrusted) => {
                let presented = e.api().and_then(|a| a.certificate.clone());
                match presented {
                    Some(cert) if super::interactive() && confirm_certificate(&req.broker, &cert)? => {
                        req.pin = Some(cert)
                    }
                    _ => return Err(e.into()),
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    if crate::output::json() {
        return super::print_json(&mesh);
    }
    out!("created mesh ");
    print_mesh(&mesh);
    outln!("invite someone with: mesh invite --mesh {}", mesh.name);
    Ok(())
}

/// Shows a certificate no authority vouches for and asks whether to pin it.
fn confirm_certificate(broker: &str, cert: &str) -> anyhow::Result<bool> {
    errln!(
        "{}",
        output::clean(&format!("the broker at {broker} presents a certificate no authority here vouches for:"))
    );
    errln!("    {}", output::clean(cert));
    errln!("compare it with the one its operator sees (`mesh broker serve` prints it on start).");
    let answer = super::prompt("pin this certificate for the mesh and everyone you invite? (yes/no)", Some("no"))?;
    Ok(answer.is_some_and(|a| a.eq_ignore_ascii_case("yes") || a.eq_ignore_ascii_case("y")))
}

/// `mesh repin [--mesh M] [--pin SHA256]`: the pin of a mesh's broker certificate, after its operator
/// changed it.
pub fn repin(args: RepinArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    let mesh = super::context_mesh(args.mesh)?;
    if args.unpin {
        let done: RepinResponse =
            super::block_on(client.post(routes::MESHES_REPIN, &RepinRequest { mesh, pin: None, unpin: true }))??;
        if output::json() {
            return super::print_json(&done);
        }
        outln!(
            "{}",
            output::clean(&format!(
                "mesh {} has no pin now: certificate authorities this machine trusts verify its broker",
                done.mesh
            ))
        );
        errln!("invites made from now on carry no pin; members who joined before run `mesh repin --unpin` themselves");
        return Ok(());
    }
    let pin = match args.pin {
        Some(pin) => pin,
        None => {
            let seen: RepinResponse = super::block_on(
                client.post(routes::MESHES_REPIN, &RepinRequest { mesh: mesh.clone(), pin: None, unpin: false }),
            )??;
            if output::json() && !super::interactive() {
                return super::print_json(&seen);
            }
            let current = match &seen.previous {
                Some(p) if *p == seen.presented => "the pinned one".to_owned(),
                Some(p) if seen.trusted_by_platform => {
                    format!("not the pinned one ({p}), but an authority here vouches for it (mesh repin --unpin)")
                }
                Some(p) => format!("not the pinned one ({p})"),
                None if seen.trusted_by_platform => {
                    "vouched for by a certificate authority; the mesh has no pin".into()
                }
                None => "the mesh has no pin".into(),
            };
            errln!("{}", output::clean(&format!("mesh {}: the broker at {} presents", seen.mesh, seen.broker)));
            errln!("    {}", output::clean(&seen.presented));
            errln!("{}", output::clean(&format!("which is {current}.")));
            if let Some(why) = &seen.pin_refused {
                errln!("{}", output::clean(&format!("with its pin, the broker is refused: {why}")));
            }
            // Nothing to do: the pinned certificate is presented, or authorities vouch for an unpinned one.
            if seen.previous.as_deref() == Some(seen.presented.as_str())
                || (seen.previous.is_none() && seen.trusted_by_platform)
            {
                return Ok(());
            }
            if let Some(why) = &seen.presented_refused {
                return Err(output::fail(
                    "certificate_refused",
                    format!("pinning it would not help: {why}"),
                    Some("the broker's operator replaces the certificate; then mesh repin again".into()),
                ));
            }
            if !super::interactive() {
                return Err(output::fail(
                    "usage",
                    "confirm the certificate with the broker's operator, then pin it",
                    Some(format!("mesh repin --mesh {} --pin {}", seen.mesh, seen.presented)),
                ));
            }
            if !confirm_certificate(&seen.broker, &seen.presented)? {
                anyhow::bail!("nothing changed");
            }
            seen.presented
        }
    };
    let done: RepinResponse =
        super::block_on(client.post(routes::MESHES_REPIN, &RepinRequest { mesh, pin: Some(pin), unpin: false }))??;
    if output::json() {
        return super::print_json(&done);
    }
    outln!("{}", output::clean(&format!("mesh {} now pins {}", done.mesh, done.presented)));
    errln!("invites made from now on carry it; members who joined before run `mesh repin` themselves");
    Ok(())
}

pub fn invite(args: InviteArgs) -> anyhow::Result<()> {
    if let Some(InviteAction::Revoke { id, mesh }) = args.action {
        return super::members::revoke_invite(id, mesh);
    }
    let client = super::client()?;
    const MAX_EXPIRY: std::time::Duration = std::time::Duration::from_secs(366 * 24 * 60 * 60);
    if args.expires < std::time::Duration::from_secs(1) || args.expires > MAX_EXPIRY {
        return Err(output::fail(
            "usage",
            format!("--expires {}: an invite is valid for 1s to 366d", humantime::format_duration(args.expires)),
            Some("for example --expires 24h".into()),
        ));
    }
    let req = CreateInviteRequest {
        mesh: super::context_mesh(args.mesh)?,
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
        "invite {} to {} ({} role) for {uses} join(s), valid until {}; the token is a secret: it carries the mesh key",
        invite.id,
        invite.mesh,
        invite.role.as_str(),
        output::time(invite.expires_at)
    );
    if mesh_daemon::link::unencrypted(&invite.broker) {
        errln!(
            "{}",
            output::clean(&format!(
                "note: {} is plain ws:// to another machine; joiners need mesh join <token> --insecure",
                invite.broker
            ))
        );
    } else {
        errln!("join with: mesh join <token>");
    }
    Ok(())
}

pub fn join(args: JoinArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    let interactive = super::interactive();
    let mut display_name = match args.display_name {
        Some(n) => Some(n),
        None if interactive => super::prompt("your name in this mesh", None)?,
        None => None,
    };
    let mesh: MeshInfo = loop {
        let req = JoinMeshRequest {
            token: args.token.clone(),
            mesh_name: args.mesh_name.clone(),
            display_name: display_name.clone(),
            suffix_if_taken: !interactive,
            insecure: args.insecure,
            broker: args.broker.clone(),
        };
        match super::block_on(client.post::<_, MeshInfo>(routes::MESHES_JOIN, &req))? {
            Ok(mesh) => break mesh,
            Err(e) if interactive && e.code() == Some(ApiErrorCode::NameTaken) => {
                errln!("{e}");
                display_name = super::prompt("another name", None)?;
                if display_name.is_none() {
                    anyhow::bail!("no name given; nothing joined");
                }
            }
            Err(e) => return Err(e.into()),
        }
    };
    if output::json() {
        return super::print_json(&mesh);
    }
    out!("joined mesh ");
    print_mesh(&mesh);
    if let Ok(token) = mesh_proto::invite::InviteToken::decode(&args.token)
        && token.claims.mesh_name != mesh.name
        && args.mesh_name.as_deref() != Some(mesh.name.as_str())
    {
        let note = format!(
            "note: this mesh is {:?} here (its members call it {:?}; that name is taken here or not allowed)",
            mesh.name, token.claims.mesh_name
        );
        errln!("{}", output::clean(&note));
    }
    if let Some(taken) = &mesh.name_was_taken {
        errln!(
            "note: {taken:?} is taken in this mesh; you are {:?} there (change it with `mesh rename`)",
            mesh.my_name
        );
    }
    Ok(())
}

/// `mesh rename NAME`: your display name in one mesh, checked by its broker.
pub fn rename(args: RenameArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    let req = RenameRequest { name: args.name, mesh: super::context_mesh(args.mesh)? };
    let mesh: MeshInfo = super::block_on(client.post(routes::MESHES_RENAME, &req))??;
    if output::json() {
        return super::print_json(&mesh);
    }
    outln!("you are now {:?} in mesh {}", mesh.my_name, mesh.name);
    Ok(())
}

/// `mesh limits [--sessions-per-member N] [--connections-per-member N] [--connections N] [--reset]`:
/// shows a mesh's limits, or (an owner or admin) changes them.
pub fn limits(args: LimitsArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    let mesh = super::context_mesh(args.mesh)?;
    let changing = args.reset
        || args.sessions_per_member.is_some()
        || args.connections_per_member.is_some()
        || args.connections.is_some();
    let info: MeshLimitsInfo = if changing {
        let req = SetLimitsRequest {
            mesh,
            reset: args.reset,
            sessions_per_member: args.sessions_per_member,
            connections_per_member: args.connections_per_member,
            connections: args.connections,
        };
        super::block_on(client.post(routes::MESHES_LIMITS, &req))??
    } else {
        super::block_on(client.get_query(routes::MESHES_LIMITS, &LimitsQuery { mesh }))??
    };
    if output::json() {
        return super::print_json(&info);
    }
    outln!("{}", output::clean(&format!("limits of mesh {}{}:", info.mesh, if changing { ", now" } else { "" })));
    let rows = [
        ("sessions per member", info.limits.sessions_per_member, info.broker.sessions_per_member),
        ("connections per member", info.limits.connections_per_member, info.broker.connections_per_member),
        ("connections", info.limits.connections, info.broker.connections),
    ];
    for (what, value, most) in rows {
        outln!("  {what:<24}{value:>8}   (broker allows {most})");
    }
    if !changing && info.can_change {
        outln!(
            "change them with `mesh limits --sessions-per-member N` (or --connections-per-member, --connections, --reset)"
        );
    }
    Ok(())
}

/// `mesh use [MESH] [--clear]`: the mesh commands mean when they do not say.
pub fn use_mesh(args: UseArgs) -> anyhow::Result<()> {
    let client = super::client()?;
    if super::in_session() && args.mesh.is_none() && !args.clear {
        let me: mesh_ipc::api::SessionInfo = super::block_on(client.get(routes::SESSION))??;
        if output::json() {
            return super::print_json(&serde_json::json!({ "mesh": me.mesh, "session": true }));
        }
        outln!("{}", output::clean(&format!("this session acts in its own mesh, {}, whatever the context", me.mesh)));
        return Ok(());
    }
    let context: Context = if args.clear || args.mesh.is_some() {
        super::block_on(client.put(routes::CONTEXT, &Context { mesh: args.mesh }))??
    } else {
        super::block_on(client.get(routes::CONTEXT))??
    };
    let env = super::context_mesh(None)?;
    let env_known = match &env {
        Some(e) => {
            let meshes: Vec<MeshInfo> = super::block_on(client.get(routes::MESHES))??;
            meshes.iter().any(|m| m.name == *e || m.id == *e)
        }
        None => true,
    };
    if output::json() {
        return super::print_json(&serde_json::json!({ "mesh": context.mesh, "env": env, "env_known": env_known }));
    }
    if let Some(e) = &env {
        outln!("{} is set to {e:?}: in this shell it is the context, whatever `mesh use` says", mesh_ipc::CONTEXT_ENV);
        if !env_known {
            errln!("warning: you are in no mesh named {e:?}; commands will fail with unknown_mesh (see `mesh meshes`)");
        }
    }
    match &context.mesh {
        Some(m) => outln!("`mesh use` context: mesh {m} (commands without --mesh act in it)"),
        None => outln!("no `mesh use` context: commands without --mesh look in every mesh"),
    }
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
    let q = PeersQuery { mesh: super::context_mesh(args.mesh)?, all_meshes: args.all_meshes };
    let peers: Vec<PeerInfo> = super::block_on(client.get_query(routes::PEERS, &q))??;
    if output::json() {
        return super::print_json(&peers);
    }
    if peers.is_empty() {
        outln!("no peers known yet (the daemon learns the roster when it connects to the broker)");
    }
    for p in &peers {
        let state = match (p.ended_at, p.online) {
            (Some(t), _) => format!("ended {}", output::ago(t)),
            (None, true) => "online".to_owned(),
            (None, false) => {
                p.last_seen.map_or_else(|| "offline".to_owned(), |t| format!("offline, seen {}", output::ago(t)))
            }
        };
        let me = if p.is_self { "  (you)" } else { "" };
        let groups = if p.groups.is_empty() {
            String::new()
        } else {
            format!("  {}", p.groups.iter().map(|g| format!("@{g}")).collect::<Vec<_>>().join(" "))
        };
        let line = format!(
            "{:<20} {}  {:<8} {:<7} mesh {:<12} [{state}]{groups}{me}",
            p.name,
            output::short(&p.key),
            p.kind.as_str(),
            p.role.as_str(),
            p.mesh
        );
        outln!("{}", output::clean(&line));
    }
    Ok(())
}
