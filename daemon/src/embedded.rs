//! The embedded broker: the same broker library, on a loopback port, with its own SQLite file.
//!
//! On a home with no mesh, the daemon starts it and creates a local mesh owned by this member, so the
//! first `mesh daemon up` leaves a working mesh with nothing to configure; `mesh invite` on it gives a
//! token another home on this machine can join. Its port is chosen once and kept (invites carry the
//! URL), and mesh creation on it requires a random token only this daemon knows.

use std::sync::Arc;

use mesh_broker::{BrokerConfig, SqliteStore};
use mesh_proto::crypto::{self, GroupKey};
use mesh_proto::wire::{Intent, Role};
use mesh_proto::{MeshId, codec};

use crate::clock::now_ms;
use crate::daemon::Daemon;
use crate::link;
use crate::meshes::{self, MeshRow};
use crate::store::{get_setting, set_setting};

const PORT_KEY: &str = "embedded.port";
const TOKEN_KEY: &str = "embedded.create_token";

#[derive(Debug, thiserror::Error)]
pub enum EmbeddedError {
    #[error("embedded broker: port {port} on 127.0.0.1 is taken; free it, or remove the embedded mesh")]
    PortTaken {
        port: u16,
        #[source]
        source: std::io::Error,
    },
    #[error("embedded broker")]
    Io(#[from] std::io::Error),
    #[error("embedded broker database")]
    Db(#[from] mesh_broker::sqlite::DbError),
    #[error("creating the local mesh")]
    Create(#[from] link::LinkError),
}

/// Starts the embedded broker (if this home uses one) and returns its URL and create token.
pub async fn start(daemon: &Arc<Daemon>) -> Result<(String, String), EmbeddedError> {
    let (port, token) = daemon
        .db
        .call(|c| {
            let port = get_setting(c, PORT_KEY)?.and_then(|p| p.parse::<u16>().ok());
            let token = match get_setting(c, TOKEN_KEY)? {
                Some(t) => t,
                None => {
                    let t = codec::b64url(&crypto::random_bytes::<24>());
                    set_setting(c, TOKEN_KEY, &t)?;
                    t
                }
            };
            Ok((port, token))
        })
        .await?;
    let listener = match tokio::net::TcpListener::bind(("127.0.0.1", port.unwrap_or(0))).await {
        Ok(l) => l,
        Err(source) if port.is_some() => return Err(EmbeddedError::PortTaken { port: port.unwrap_or(0), source }),
        Err(e) => return Err(e.into()),
    };
    let bound = listener.local_addr()?.port();
    if port != Some(bound) {
        daemon.db.call(move |c| set_setting(c, PORT_KEY, &bound.to_string())).await?;
    }
    let store = SqliteStore::open(&daemon.home.embedded_broker_db())?;
    // Every peer of the embedded broker is on this machine, so all come from one address: the
    // per-address bounds of connections not yet authenticated are the broker-wide ones here.
    let defaults = BrokerConfig::default();
    let config = BrokerConfig {
        create_token: Some(token.clone()),
        max_pending_per_address: defaults.max_pending_handshakes,
        handshakes_per_sec_per_address: 1000,
        ..defaults
    };
    let url = format!("ws://127.0.0.1:{bound}");
    tracing::info!(%url, "embedded broker started");
    daemon.tracker.spawn(mesh_broker::run(listener, Arc::new(store), config, daemon.shutdown.clone()));
    *daemon.embedded_broker.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = Some(url.clone());
    Ok((url, token))
}

/// Creates this member's local mesh on the embedded broker.
pub async fn create_local_mesh(daemon: &Arc<Daemon>, url: &str, token: &str) -> Result<MeshRow, EmbeddedError> {
    let member = &daemon.member;
    let wanted = format!("{}-local", member.name);
    let name = match mesh_proto::names::validate_display(&wanted) {
        Ok(()) => wanted,
        Err(_) => "local".to_owned(),
    };
    let mesh_id = MeshId::generate();
    let intent = Intent::Create { mesh_name: name.clone(), create_token: Some(token.to_owned()) };
    let broker = link::Broker { url, pin: None, mesh: &name };
    let (_ws, welcome) = link::handshake(broker, &member.identity, &member.name, mesh_id, None, |_| intent).await?;
    let row = MeshRow {
        id: mesh_id,
        name,
        broker_url: url.to_owned(),
        role: Role::Owner,
        group_key: GroupKey::generate(),
        key_epoch: 0,
        embedded: true,
        joined_at: now_ms(),
        my_name: None,
        tls_pin: None,
    };
    let stored = row.clone();
    daemon
        .db
        .call(move |c| {
            let name = meshes::free_name(c, &stored.name)?;
            let stored = MeshRow { name, ..stored };
            meshes::insert(c, &stored)?;
            crate::roster::replace(c, &stored.id, &welcome.roster)?;
            Ok(stored)
        })
        .await
        .map_err(EmbeddedError::from)
}

/// Creates the local mesh `local` again, with its id, name and keys, on an embedded broker that
/// started on a new database (`mesh daemon up --fresh` after its database was lost).
pub async fn recreate_local_mesh(
    daemon: &Arc<Daemon>,
    url: &str,
    token: &str,
    local: &MeshRow,
) -> Result<(), EmbeddedError> {
    let member = &daemon.member;
    let intent = Intent::Create { mesh_name: local.name.clone(), create_token: Some(token.to_owned()) };
    let name = local.my_name.clone().unwrap_or_else(|| member.name.clone());
    let broker = link::Broker { url, pin: None, mesh: &local.name };
    let (_ws, welcome) = link::handshake(broker, &member.identity, &name, local.id, None, |_| intent).await?;
    let id = local.id;
    daemon.db.call(move |c| crate::roster::replace(c, &id, &welcome.roster)).await?;
    Ok(())
}
