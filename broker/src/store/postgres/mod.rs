//! The PostgreSQL implementation of [`Store`]: several broker replicas share one database.
//!
//! Every write is one transaction on a pooled connection (`deadpool-postgres`, statements prepared
//! once per connection), with the same boundaries as SQLite: a send is committed to each recipient's
//! queue before it is accepted; a queue row leaves only by an ack or its TTL, each a `DELETE …
//! RETURNING` in the transaction that queues the receipt, so two replicas acking or expiring the same
//! row at once queue one receipt. Leases are claimed with `FOR UPDATE SKIP LOCKED` and carry the
//! replica and connection holding them. Names are claimed under a per-mesh advisory lock, invite uses
//! are counted by one conditional upsert. A transaction that loses a deadlock or a serialization
//! check is run again.

use std::str::FromStr;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use async_trait::async_trait;
use deadpool_postgres::{GenericClient, Manager, ManagerConfig, Pool, RecyclingMethod, Runtime};
use mesh_proto::{MeshId, PublicKey};
use tokio_postgres::NoTls;
use tokio_postgres::error::SqlState;
use tokio_util::sync::CancellationToken;

use super::{
    Claimed, Cluster, ClusterEvent, Ended, Enqueued, Expired, InviteRecord, JoinOutcome, Lease, MembershipChange,
    MembershipOutcome, MeshLimitSettings, MeshRecord, NewMessage, Note, PeerRecord, QueueStat, Reaped, Receipted,
    RosterEntry, SentRecord, Store, StoreError,
};
use crate::sqlite::CommitObserver;

mod peers;
mod queue;
mod schema;

/// The advisory lock class of per-mesh name claims (the second key is the mesh id's hash).
const NAMES_LOCK: i32 = 0x6d65_7368;

/// How many times a transaction that lost a deadlock or serialization check is run.
pub(crate) const ATTEMPTS: u32 = 5;

#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error(
        "the PostgreSQL address cannot be read ({0}); expected postgres://USER:PASSWORD@HOST:PORT/DB, a port of 1 to \
         65535, and parameters this build reads (host, hostaddr, port, dbname, user, password, options, application_name, \
         sslmode=disable or prefer, connect_timeout, keepalives…)"
    )]
    Address(String),
    #[error("{0}")]
    Unsupported(&'static str),
    #[error("connecting to PostgreSQL at {at}")]
    Connect {
        at: String,
        #[source]
        source: tokio_postgres::Error,
    },
    #[error("connecting to PostgreSQL at {at}: {why}")]
    Pool { at: String, why: String },
    #[error("the database at {at} has schema version {found}, newer than this build knows ({known}); upgrade mesh")]
    TooNew { at: String, found: i32, known: i32 },
    #[error("migrating the database at {at} to version {version}")]
    Migrate {
        at: String,
        version: usize,
        #[source]
        source: tokio_postgres::Error,
    },
}

/// How the broker uses the database.
#[derive(Clone, Debug)]
pub struct PgOptions {
    /// Connections this replica holds at most.
    pub pool_size: usize,
}

impl Default for PgOptions {
    fn default() -> Self {
        PgOptions { pool_size: 16 }
    }
}

/// `value` without blanks or invisible characters (a zero-width space, a byte order mark) around it,
/// as a pasted or env-file value may carry.
fn trimmed(value: &str) -> &str {
    value.trim_matches(|c: char| c.is_whitespace() || matches!(c, '\u{200B}'..='\u{200D}' | '\u{2060}' | '\u{FEFF}'))
}

/// Whether `address` names a PostgreSQL database rather than a file: `postgres://` or
/// `postgresql://` (any case), or libpq's `host=… dbname=…` form; blanks around it do not count.
pub fn is_postgres_address(address: &str) -> bool {
    let address = trimmed(address);
    scheme_end(address).is_some() || is_key_value(address)
}

/// Where a `postgres://` or `postgresql://` scheme (any case) ends.
fn scheme_end(address: &str) -> Option<usize> {
    ["postgresql://", "postgres://"].into_iter().find_map(|scheme| {
        let head = address.get(..scheme.len())?;
        head.eq_ignore_ascii_case(scheme).then_some(scheme.len())
    })
}

/// libpq's `key=value` form: a parameter name, then `=` (`host=/run/postgresql dbname=mesh`,
/// `dbname = mesh password='a b'`).
fn is_key_value(address: &str) -> bool {
    let name_end = address.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(address.len());
    name_end > 0 && address[name_end..].trim_start().starts_with('=')
}

/// Why `value`, not a PostgreSQL address, is no file name either: an address of another kind
/// (`mysql://…`), a PostgreSQL one misspelt (`postgres:/…`, `postgres//…`, `postgres ://…`), quoted,
/// libpq's words without `=`, or a control character. Taken for a file, it would make one named
/// after its password. The reason never repeats the value.
pub fn not_a_file(value: &str) -> Option<String> {
    if value.chars().any(char::is_control) {
        return Some("it holds a control character (a line break?)".into());
    }
    let value = trimmed(value);
    if value.starts_with(['"', '\'']) {
        return Some("it is in quotes: give the address without them".into());
    }
    if let Some((scheme, rest)) = value.split_once(':') {
        let is_scheme = scheme.starts_with(|c: char| c.is_ascii_alphabetic())
            && scheme.chars().all(|c| c.is_ascii_alphanumeric() || "+-.".contains(c));
        if is_scheme && ["postgres", "postgresql"].iter().any(|p| scheme.eq_ignore_ascii_case(p)) {
            return Some(format!("{scheme}:… is a misspelt PostgreSQL address (postgres://…)"));
        }
        if is_scheme && rest.starts_with("//") {
            return Some(format!("{scheme}://… is neither a SQLite file nor a PostgreSQL address"));
        }
    }
    if value.contains("://") {
        return Some("it holds :// like an address, but not a PostgreSQL one".into());
    }
    let lower = value.to_ascii_lowercase();
    if let Some(rest) = lower.strip_prefix("postgresql").or_else(|| lower.strip_prefix("postgres"))
        && (rest.contains("//") || rest.starts_with([':', ';', ' ', '/', '\t']))
    {
        return Some("it looks like a misspelt postgres:// address".into());
    }
    // USER:PASSWORD@HOST without its scheme (`mesh:pw@db/mesh`, `//mesh:pw@db/mesh`).
    if let Some((before, _)) = value.split_once('@')
        && before.contains(':')
    {
        return Some("it looks like USER:PASSWORD@HOST without postgres:// before it".into());
    }
    let first = lower.split_whitespace().next().unwrap_or_default();
    let libpq = ["host", "hostaddr", "port", "dbname", "user", "password"].contains(&first);
    if libpq && lower.contains(char::is_whitespace) {
        return Some("it looks like libpq's key=value form without the = signs".into());
    }
    None
}

/// `address` with its scheme in lower case, as the driver reads it.
fn normalized(address: &str) -> std::borrow::Cow<'_, str> {
    match scheme_end(address) {
        Some(end) => format!("{}{}", address[..end].to_ascii_lowercase(), &address[end..]).into(),
        None => address.into(),
    }
}

/// `address` without its password, for logs and messages.
pub fn redacted(address: &str) -> String {
    use tokio_postgres::config::Host;
    let Ok(config) = tokio_postgres::Config::from_str(&normalized(trimmed(address))) else {
        return "postgres://(unreadable address)".into();
    };
    let user = config.get_user().map(|u| format!("{u}@")).unwrap_or_default();
    // Each host with its port (one port for all when only one is given), 5432 left out.
    let ports = config.get_ports();
    let port_of = |i: usize| match ports.get(i).or(if ports.len() == 1 { ports.first() } else { None }) {
        Some(p) if *p != 5432 => format!(":{p}"),
        _ => String::new(),
    };
    let (mut tcp, mut unix) = (Vec::new(), Vec::new());
    for (i, host) in config.get_hosts().iter().enumerate() {
        match host {
            // An `@` of the password not percent-encoded ends up in the host: never shown.
            Host::Tcp(name) => tcp.push(format!("{}{}", name.rsplit('@').next().unwrap_or_default(), port_of(i))),
            Host::Unix(path) => unix.push(path.display().to_string()),
        }
    }
    if config.get_hosts().is_empty() {
        // libpq's `hostaddr=` alone.
        tcp.extend(config.get_hostaddrs().iter().enumerate().map(|(i, a)| format!("{a}{}", port_of(i))));
    }
    let db = config.get_dbname().unwrap_or("");
    let sockets = if unix.is_empty() { String::new() } else { format!("?host={}", unix.join(",")) };
    format!("postgres://{user}{}/{db}{sockets}", tcp.join(","))
}

#[derive(Clone)]
pub struct PgStore {
    pool: Pool,
    /// For the connection that listens to the other replicas.
    pg_config: tokio_postgres::Config,
    /// Notes for the other replicas, sent coalesced.
    outbox: Arc<cluster::Outbox>,
    /// This replica's row in `replicas`: leases carry it, so that one replica never frees another's.
    replica: i64,
    observer: Arc<OnceLock<CommitObserver>>,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PgStore(replica {})", self.replica)
    }
}

impl PgStore {
    /// Connects, brings the schema up to date (one replica at a time, under an advisory lock) and
    /// registers this replica.
    pub async fn connect(address: &str, options: PgOptions) -> Result<PgStore, PgError> {
        let address = trimmed(address);
        let at = redacted(address);
        let mut config = check_address(address)?;
        // These bound how long a connection waits on a server that never answers; a cut network is
        // noticed sooner by the listening connection's pings.
        config.connect_timeout(Duration::from_secs(10)).keepalives_idle(Duration::from_secs(30));
        let manager =
            Manager::from_config(config.clone(), NoTls, ManagerConfig { recycling_method: RecyclingMethod::Fast });
        let pool = Pool::builder(manager)
            .max_size(options.pool_size.max(2))
            .runtime(Runtime::Tokio1)
            .wait_timeout(Some(Duration::from_secs(30)))
            .create_timeout(Some(Duration::from_secs(10)))
            .build()
            .map_err(|e| PgError::Pool { at: at.clone(), why: e.to_string() })?;
        let mut client = pool.get().await.map_err(|e| pool_error(&at, e))?;
        schema::migrate(&mut client, &at).await?;
        let replica: i64 = client
            .query_one(
                "INSERT INTO replicas (started_at, heartbeat_at) VALUES ($1, $1) RETURNING id",
                &[&(mesh_proto::now_ms() as i64)],
            )
            .await
            .map_err(|source| PgError::Connect { at: at.clone(), source })?
            .get(0);
        tracing::info!(replica, database = %at, "broker replica registered");
        Ok(PgStore {
            pool,
            pg_config: config,
            outbox: Arc::new(cluster::Outbox::new()),
            replica,
            observer: Arc::new(OnceLock::new()),
        })
    }

    /// This replica's number in the database.
    pub fn replica(&self) -> i64 {
        self.replica
    }

    async fn client(&self) -> Result<deadpool_postgres::Object, StoreError> {
        self.pool
            .get()
            .await
            .map_err(|e| StoreError::Backend(format!("no database connection: {}", mesh_proto::error::chain(&e))))
    }

    /// One statement outside a transaction, prepared once per pooled connection: its rows.
    async fn query(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(TxError::from)?;
        Ok(client.query(&stmt, params).await.map_err(TxError::from)?)
    }

    /// [`PgStore::query`] for a statement that returns no rows: how many it changed.
    async fn execute(
        &self,
        sql: &str,
        params: &[&(dyn tokio_postgres::types::ToSql + Sync)],
    ) -> Result<u64, StoreError> {
        let client = self.client().await?;
        let stmt = client.prepare_cached(sql).await.map_err(TxError::from)?;
        Ok(client.execute(&stmt, params).await.map_err(TxError::from)?)
    }

    fn observe(&self, ops: usize, started: Instant) {
        if let Some(observer) = self.observer.get() {
            observer(ops, started.elapsed());
        }
    }
}

/// Reads `address` as the broker would connect with it, refusing what it cannot use (TLS, an `@` not
/// percent-encoded, an unreadable address) without connecting: `mesh broker install-service` checks
/// an address with it before writing a unit that could never start. No host means the local socket
/// (`$PGHOST`, else the distribution's directory), no port `$PGPORT`, no user `$PGUSER` or the
/// login name, as `psql`.
pub fn check_address(address: &str) -> Result<tokio_postgres::Config, PgError> {
    let address = trimmed(address);
    // Quotes and blanks of the key=value form do not hide a TLS mode.
    let bare: String = address.chars().filter(|c| !c.is_whitespace() && !"'\"".contains(*c)).collect();
    let bare = bare.to_ascii_lowercase();
    let verify = ["sslmode=verify-ca", "sslmode=verify-full"].iter().any(|m| bare.contains(m));
    let mut config = tokio_postgres::Config::from_str(&normalized(address)).map_err(|e| match verify {
        true => PgError::Unsupported(NO_TLS),
        false => PgError::Address(e.to_string()),
    })?;
    if verify || config.get_ssl_mode() == tokio_postgres::config::SslMode::Require {
        return Err(PgError::Unsupported(NO_TLS));
    }
    if config.get_hosts().iter().any(|h| matches!(h, tokio_postgres::config::Host::Tcp(name) if name.contains('@'))) {
        return Err(PgError::Address(
            "an @ after the user name's: percent-encode an @ in the user name or password as %40".into(),
        ));
    }
    if config.get_hosts().is_empty() && config.get_hostaddrs().is_empty() {
        config.host_path(local_socket_dir());
    }
    if config.get_ports().is_empty()
        && let Some(port) = std::env::var("PGPORT").ok().and_then(|p| p.parse::<u16>().ok())
    {
        config.port(port);
    }
    if config.get_user().is_none()
        && let Some(user) =
            ["PGUSER", "USER", "LOGNAME"].iter().find_map(|v| std::env::var(v).ok().filter(|u| !u.is_empty()))
    {
        config.user(user);
    }
    Ok(config)
}

/// Why a TLS connection to PostgreSQL is refused.
const NO_TLS: &str = "sslmode=require (or verify-ca, verify-full) asks for TLS to PostgreSQL, which this build does \
                      not speak; reach the database over a private network or its Unix socket";

/// Where a PostgreSQL address without a host leads, as libpq: `$PGHOST` when it names a directory,
/// else the distribution's socket directory, else `/tmp`.
fn local_socket_dir() -> std::path::PathBuf {
    let from_env = std::env::var_os("PGHOST").map(std::path::PathBuf::from).filter(|p| p.is_absolute());
    from_env.unwrap_or_else(|| {
        let debian = std::path::Path::new("/var/run/postgresql");
        if debian.is_dir() { debian.to_owned() } else { std::path::PathBuf::from("/tmp") }
    })
}

fn pool_error(at: &str, e: deadpool_postgres::PoolError) -> PgError {
    match e {
        deadpool_postgres::PoolError::Backend(source) => PgError::Connect { at: at.to_owned(), source },
        deadpool_postgres::PoolError::Timeout(_) => PgError::Pool {
            at: at.to_owned(),
            why: "no answer within 10 s (is a PostgreSQL server on that port?)".into(),
        },
        other => PgError::Pool { at: at.to_owned(), why: other.to_string() },
    }
}

/// Inside a transaction: a domain outcome that rolls back, or a database failure.
#[derive(Debug)]
enum TxError {
    Domain(StoreError),
    Pg(tokio_postgres::Error),
    /// A stored value this build cannot read.
    Corrupt(String),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> Self {
        TxError::Pg(e)
    }
}

impl From<TxError> for StoreError {
    fn from(e: TxError) -> Self {
        match e {
            TxError::Domain(e) => e,
            TxError::Pg(e) => StoreError::Backend(mesh_proto::error::chain(&e)),
            TxError::Corrupt(what) => StoreError::Backend(what),
        }
    }
}

impl TxError {
    /// Lost a deadlock or a serialization check, or a batch of sends lost the race for a client
    /// message id to the same send through another replica: running the transaction again may
    /// succeed (and answers that send as a duplicate).
    fn is_retryable(&self) -> bool {
        let TxError::Pg(e) = self else { return false };
        let Some(db) = e.as_db_error() else { return false };
        let code = db.code();
        *code == SqlState::T_R_DEADLOCK_DETECTED
            || *code == SqlState::T_R_SERIALIZATION_FAILURE
            || (*code == SqlState::UNIQUE_VIOLATION && db.constraint() == Some(schema::SEND_KEY))
    }
}

/// Parses a stored text column.
fn parse<T: FromStr>(s: &str) -> Result<T, TxError>
where
    T::Err: std::fmt::Display,
{
    T::from_str(s).map_err(|e| TxError::Corrupt(format!("invalid stored value {s:?}: {e}")))
}

/// Runs `$body` in a transaction on a pooled connection (`$tx` names it), committing when it
/// finishes; a `return Err(..)` in it rolls back. Run again when it loses a deadlock or a
/// serialization check; `$ops` is the number of operations it carries, for the commit metrics.
macro_rules! transaction {
    ($store:expr, $ops:expr, |$tx:ident| $body:block) => {{
        let mut attempt = 0;
        loop {
            attempt += 1;
            let started = std::time::Instant::now();
            let mut client = $store.client().await?;
            let result: Result<_, TxError> = async {
                let $tx = client.transaction().await?;
                let out = $body;
                $tx.commit().await?;
                Ok(out)
            }
            .await;
            match result {
                Ok(out) => {
                    $store.observe($ops, started);
                    break Ok(out);
                }
                Err(e) if e.is_retryable() && attempt < $crate::store::postgres::ATTEMPTS => {
                    tracing::debug!(attempt, error = ?e, "transaction lost a deadlock or serialization check; again");
                }
                Err(e) => break Err(StoreError::from(e)),
            }
        }
    }};
}

/// The `Option<i64>` a limit is stored as.
fn limit_col(v: Option<u32>) -> Option<i64> {
    v.map(i64::from)
}

fn limit_from(v: Option<i64>) -> Option<u32> {
    v.and_then(|v| u32::try_from(v).ok())
}

mod cluster;

#[async_trait]
impl Cluster for PgStore {
    fn start(
        &self,
        events: tokio::sync::mpsc::UnboundedSender<ClusterEvent>,
        stop: CancellationToken,
    ) -> tokio::task::JoinHandle<()> {
        self.start_cluster(events, stop)
    }

    fn publish(&self, note: Note) {
        self.publish_outgoing(cluster::Outgoing::Note(note));
    }

    async fn claim_connection(
        &self,
        mesh: MeshId,
        key: PublicKey,
        member: PublicKey,
        conn: u64,
    ) -> Result<(), StoreError> {
        self.claim(mesh, key, member, conn).await
    }

    async fn reclaim_connection(
        &self,
        mesh: MeshId,
        key: PublicKey,
        member: PublicKey,
        conn: u64,
    ) -> Result<bool, StoreError> {
        self.reclaim(mesh, key, member, conn).await
    }

    async fn drop_connection(&self, mesh: MeshId, key: PublicKey, conn: u64) -> Result<(), StoreError> {
        self.unclaim(mesh, key, conn).await
    }

    async fn connected(&self, mesh: MeshId) -> Result<Vec<(PublicKey, PublicKey)>, StoreError> {
        self.connected_keys(mesh).await
    }
}

#[async_trait]
impl Store for PgStore {
    fn cluster(&self) -> Option<&dyn Cluster> {
        Some(self)
    }

    async fn create_mesh(&self, mesh: MeshRecord, owner: PeerRecord) -> Result<(), StoreError> {
        transaction!(self, 1, |tx| {
            let inserted = tx
                .execute(
                    "INSERT INTO meshes (id, name, owner, created_at) VALUES ($1, $2, $3, $4) ON CONFLICT (id) DO NOTHING",
                    &[&mesh.id.to_string(), &mesh.name, &mesh.owner.to_string(), &(mesh.created_at as i64)],
                )
                .await?;
            if inserted == 0 {
                return Err(TxError::Domain(StoreError::MeshExists));
            }
            peers::insert_peer(&tx, &mesh.id, &owner).await?;
        })
    }

    async fn mesh(&self, id: MeshId) -> Result<Option<MeshRecord>, StoreError> {
        let client = self.client().await?;
        let row = client
            .query_opt(
                "SELECT id, name, owner, created_at, max_sessions_per_member, max_connections_per_member, \
                 max_connections, key_epoch, rekey_wanted_at FROM meshes WHERE id = $1",
                &[&id.to_string()],
            )
            .await
            .map_err(TxError::from)?;
        let Some(r) = row else { return Ok(None) };
        let record = (|| {
            Ok::<_, TxError>(MeshRecord {
                id: parse(r.get(0))?,
                name: r.get(1),
                owner: parse(r.get(2))?,
                created_at: r.get::<_, i64>(3) as u64,
                limits: MeshLimitSettings {
                    sessions_per_member: limit_from(r.get(4)),
                    connections_per_member: limit_from(r.get(5)),
                    connections: limit_from(r.get(6)),
                },
                key_epoch: r.get::<_, i64>(7) as u64,
                rekey_wanted: r.get::<_, Option<i64>>(8).is_some(),
            })
        })()?;
        Ok(Some(record))
    }

    async fn peer(&self, mesh: MeshId, key: PublicKey) -> Result<Option<PeerRecord>, StoreError> {
        let client = self.client().await?;
        Ok(peers::get_peer(&client, &mesh, &key).await?)
    }

    async fn join(&self, mesh: MeshId, invite: InviteRecord, peer: PeerRecord) -> Result<JoinOutcome, StoreError> {
        transaction!(self, 1, |tx| {
            if let Some(existing) = peers::get_peer(&tx, &mesh, &peer.key).await?.filter(|p| !p.revoked) {
                return Ok(JoinOutcome::AlreadyMember(existing));
            }
            let claimed = peers::join(&tx, &mesh, &invite, &peer).await?;
            JoinOutcome::Joined(peer.clone(), claimed)
        })
    }

    async fn register_invite(&self, mesh: MeshId, invite: InviteRecord) -> Result<(), StoreError> {
        transaction!(self, 1, |tx| {
            peers::live_admin(&tx, &mesh, &invite.issued_by, "mint invites").await?;
            peers::record_invite(&tx, &mesh, &invite).await?;
        })
    }

    async fn invites(&self, mesh: MeshId) -> Result<Vec<mesh_proto::wire::InviteInfo>, StoreError> {
        let client = self.client().await?;
        Ok(peers::invites(&client, &mesh).await?)
    }

    async fn revoke_invite(&self, mesh: MeshId, invite_id: String, by: PublicKey, now: u64) -> Result<(), StoreError> {
        transaction!(self, 1, |tx| { peers::revoke_invite(&tx, &mesh, &invite_id, &by, now).await? })
    }

    async fn change_membership(&self, mesh: MeshId, change: MembershipChange) -> Result<MembershipOutcome, StoreError> {
        transaction!(self, 1, |tx| { peers::change_membership(&tx, &mesh, &change).await? })
    }

    async fn rotate_key(
        &self,
        mesh: MeshId,
        by: PublicKey,
        epoch: u64,
        grants: Vec<(PublicKey, String)>,
        now: u64,
    ) -> Result<Vec<PublicKey>, StoreError> {
        transaction!(self, 1, |tx| { peers::rotate_key(&tx, &mesh, &by, epoch, &grants, now).await? })
    }

    async fn want_rekey(&self, mesh: MeshId, have: u64, now: u64) -> Result<bool, StoreError> {
        let changed = self
            .execute(
                "UPDATE meshes SET rekey_wanted_at = COALESCE(rekey_wanted_at, $3) WHERE id = $1 AND key_epoch > $2",
                &[&mesh.to_string(), &(have as i64), &(now as i64)],
            )
            .await?;
        Ok(changed == 1)
    }

    async fn delete_mesh(&self, mesh: MeshId, by: PublicKey) -> Result<Vec<PublicKey>, StoreError> {
        transaction!(self, 1, |tx| { peers::delete_mesh(&tx, &mesh, &by).await? })
    }

    async fn upsert_peer(&self, mesh: MeshId, peer: PeerRecord) -> Result<Claimed, StoreError> {
        transaction!(self, 1, |tx| { peers::upsert(&tx, &mesh, &peer).await? })
    }

    async fn touch_peer(&self, mesh: MeshId, key: PublicKey, seen_at: u64) -> Result<(), StoreError> {
        self.execute(
            "UPDATE peers SET last_seen = $3 WHERE mesh_id = $1 AND key = $2",
            &[&mesh.to_string(), &key.to_string(), &(seen_at as i64)],
        )
        .await?;
        Ok(())
    }

    async fn live_sessions(&self, mesh: MeshId, member: PublicKey) -> Result<usize, StoreError> {
        let rows = self
            .query(
                "SELECT COUNT(*) FROM peers
                 WHERE mesh_id = $1 AND member = $2 AND kind = 'session' AND ended_at IS NULL AND NOT revoked",
                &[&mesh.to_string(), &member.to_string()],
            )
            .await?;
        Ok(rows.first().map_or(0, |r| r.get::<_, i64>(0)) as usize)
    }

    async fn roster(&self, mesh: MeshId) -> Result<Vec<RosterEntry>, StoreError> {
        let client = self.client().await?;
        Ok(peers::roster(&client, &mesh).await?)
    }

    async fn rename(&self, mesh: MeshId, key: PublicKey, name: String) -> Result<(PeerRecord, Claimed), StoreError> {
        transaction!(self, 1, |tx| { peers::rename(&tx, &mesh, &key, &name).await? })
    }

    async fn end_session(
        &self,
        mesh: MeshId,
        member: PublicKey,
        session: PublicKey,
        now: u64,
        keep_ended: usize,
    ) -> Result<Ended, StoreError> {
        transaction!(self, 1, |tx| { peers::end_session(&tx, &mesh, &member, &session, now, keep_ended).await? })
    }

    async fn reap_sessions(
        &self,
        now: u64,
        stale_ms: u64,
        grace_ms: u64,
        online: Vec<(MeshId, PublicKey)>,
    ) -> Result<Reaped, StoreError> {
        transaction!(self, 1, |tx| { peers::reap_sessions(&tx, now, stale_ms, grace_ms, &online).await? })
    }

    async fn enqueue_many(&self, msgs: Vec<NewMessage>) -> Result<Vec<Result<Enqueued, StoreError>>, StoreError> {
        transaction!(self, msgs.len(), |tx| {
            match queue::enqueue_direct(&tx, &msgs).await? {
                Some(done) => done,
                None => {
                    let mut out = Vec::with_capacity(msgs.len());
                    for msg in &msgs {
                        // Every refusal comes before the message's first write.
                        out.push(match queue::enqueue(&tx, msg).await {
                            Ok(done) => Ok(done),
                            Err(TxError::Domain(e)) => Err(e),
                            Err(e) => return Err(e),
                        });
                    }
                    out
                }
            }
        })
    }

    async fn find_sent(
        &self,
        mesh: MeshId,
        sender: PublicKey,
        client_message_id: &str,
    ) -> Result<Option<SentRecord>, StoreError> {
        let client = self.client().await?;
        Ok(queue::find_sent(&client, &mesh.to_string(), &sender.to_string(), client_message_id).await?)
    }

    async fn lease(
        &self,
        mesh: MeshId,
        recipient: PublicKey,
        conn: u64,
        limit: u32,
        now: u64,
        lease_ms: u64,
    ) -> Result<Lease, StoreError> {
        let client = self.client().await?;
        Ok(queue::lease(&client, self.replica, mesh, recipient, conn, limit, now, lease_ms).await?)
    }

    async fn ack(
        &self,
        mesh: MeshId,
        recipient: PublicKey,
        delivery_ids: Vec<u64>,
        now: u64,
    ) -> Result<Receipted, StoreError> {
        transaction!(self, 1, |tx| { queue::ack(&tx, mesh, recipient, &delivery_ids, now).await? })
    }

    async fn release(&self, mesh: MeshId, recipient: PublicKey, conn: u64) -> Result<(), StoreError> {
        self.execute(
            "UPDATE queue SET lease_until = NULL, lease_replica = NULL, lease_conn = NULL
             WHERE mesh_id = $1 AND recipient = $2 AND lease_replica = $3 AND lease_conn = $4",
            &[&mesh.to_string(), &recipient.to_string(), &self.replica, &(conn as i64)],
        )
        .await?;
        Ok(())
    }

    async fn expire(&self, now: u64) -> Result<Expired, StoreError> {
        transaction!(self, 1, |tx| { queue::expire(&tx, now).await? })
    }

    async fn queue_stats(&self, now: u64) -> Result<Vec<QueueStat>, StoreError> {
        let client = self.client().await?;
        let rows = client
            .query(
                "SELECT me.id, COUNT(q.id), MIN(m.created_at) FROM meshes me
                 LEFT JOIN queue q ON q.mesh_id = me.id LEFT JOIN messages m ON m.seq = q.message_seq
                 GROUP BY me.id",
                &[],
            )
            .await
            .map_err(TxError::from)?;
        let stats = rows
            .iter()
            .map(|r| {
                let oldest: Option<i64> = r.get(2);
                Ok(QueueStat {
                    mesh: parse(r.get(0))?,
                    depth: r.get::<_, i64>(1) as u64,
                    oldest_ms: oldest.map_or(0, |t| now.saturating_sub(t.max(0) as u64)),
                })
            })
            .collect::<Result<_, TxError>>()?;
        Ok(stats)
    }

    fn observe_commits(&self, observer: CommitObserver) {
        let _ = self.observer.set(observer);
    }

    async fn record_reads(
        &self,
        mesh: MeshId,
        reader: PublicKey,
        message_ids: Vec<String>,
        now: u64,
    ) -> Result<Receipted, StoreError> {
        transaction!(self, 1, |tx| { queue::record_reads(&tx, mesh, reader, &message_ids, now).await? })
    }

    async fn set_mesh_limits(
        &self,
        mesh: MeshId,
        reset: bool,
        change: MeshLimitSettings,
    ) -> Result<MeshLimitSettings, StoreError> {
        transaction!(self, 1, |tx| {
            // Each column: the new value when one is given; else NULL on reset; else unchanged.
            let row = tx
                .query_opt(
                    "UPDATE meshes SET \
                     max_sessions_per_member = CASE WHEN $3::BIGINT IS NOT NULL THEN $3 WHEN $2 THEN NULL \
                         ELSE max_sessions_per_member END, \
                     max_connections_per_member = CASE WHEN $4::BIGINT IS NOT NULL THEN $4 WHEN $2 THEN NULL \
                         ELSE max_connections_per_member END, \
                     max_connections = CASE WHEN $5::BIGINT IS NOT NULL THEN $5 WHEN $2 THEN NULL \
                         ELSE max_connections END \
                     WHERE id = $1 \
                     RETURNING max_sessions_per_member, max_connections_per_member, max_connections",
                    &[
                        &mesh.to_string(),
                        &reset,
                        &limit_col(change.sessions_per_member),
                        &limit_col(change.connections_per_member),
                        &limit_col(change.connections),
                    ],
                )
                .await?;
            let Some(r) = row else {
                return Err(TxError::Domain(StoreError::Backend(format!("mesh {mesh} is not in the database"))));
            };
            MeshLimitSettings {
                sessions_per_member: limit_from(r.get(0)),
                connections_per_member: limit_from(r.get(1)),
                connections: limit_from(r.get(2)),
            }
        })
    }

    async fn set_group(
        &self,
        mesh: MeshId,
        key: PublicKey,
        group: String,
        member: bool,
    ) -> Result<Vec<String>, StoreError> {
        transaction!(self, 1, |tx| { peers::set_group(&tx, &mesh, &key, &group, member).await? })
    }
}

/// Takes the per-mesh lock under which names are claimed, until the transaction ends.
async fn lock_names(tx: &impl GenericClient, mesh: &MeshId) -> Result<(), TxError> {
    tx.execute("SELECT pg_advisory_xact_lock($1, hashtext($2))", &[&NAMES_LOCK, &mesh.to_string()]).await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_told_from_files_and_misspellings_refused() {
        for address in [
            "postgres://u:p@h:5432/db",
            "PostgreSQL://u@h/db",
            "  postgres://u:p@h/db ",
            "host=/run/postgresql dbname=mesh",
            "host = 127.0.0.1 port = 5432 dbname=mesh user=app password='a b'",
            "dbname=mesh",
            "\u{200B}postgres://u:p@h/db\u{FEFF}",
        ] {
            assert!(is_postgres_address(address), "{address:?}");
            assert!(check_address(address).is_ok(), "{address:?}");
        }
        for file in ["broker.db", "/var/lib/mesh/broker.db", "./a b.db", "data/x:y.db"] {
            assert!(!is_postgres_address(file), "{file:?}");
            assert_eq!(not_a_file(file), None, "{file:?}");
        }
        for value in [
            "mysql://u:S3cret@h/db",
            "postgress://u:S3cret@h/db",
            "postgres:/u:S3cret@h/db",
            "postgres:mesh",
            " Postgresql:u:S3cret@h",
            "postgres//u:S3cret@h/db",
            "postgres.//u:S3cret@h/db",
            "postgres;//u:S3cret@h/db",
            "postgres ://u:S3cret@h/db",
            "\"postgres://u:S3cret@h/db\"",
            "'postgres://u:S3cret@h/db'",
            "host 127.0.0.1 password S3cret",
            "host=127.0.0.1 dbname=db\nuser=u password=S3cret",
            "a/b://c",
            "mesh:S3cret@127.0.0.1:5432/meshdb",
            "//mesh:S3cret@127.0.0.1:5432/meshdb",
            "mesh:S3cret@/meshdb",
        ] {
            let refused = not_a_file(value).filter(|_| !is_postgres_address(value) || value.contains('\n'));
            let why = refused.unwrap_or_else(|| panic!("{value:?} taken for a file"));
            assert!(!why.contains("S3cret"), "{value:?}: {why}");
        }
        for file in ["postgres", "postgres.db", "postgresql-backup.db", "backups/mesh@2026.db", "a:b.db"] {
            assert_eq!(not_a_file(file), None, "{file:?}");
        }
    }

    #[test]
    fn addresses_are_shown_without_their_password() {
        for (address, shown) in [
            ("postgres://app:S3cret@db.internal:5432/mesh", "postgres://app@db.internal/mesh"),
            ("postgres://app:S3cret@db:6000/mesh", "postgres://app@db:6000/mesh"),
            (
                "host=127.0.0.1 port=25432 dbname=appdb user=app password='S3cret PW'",
                "postgres://app@127.0.0.1:25432/appdb",
            ),
            ("postgres://mesh@/db?host=/run/postgresql", "postgres://mesh@/db?host=/run/postgresql"),
            // An @ of the password not percent-encoded: the part after it is no host to show.
            ("postgres://app:p@ss@127.0.0.1:25432/appdb", "postgres://app@127.0.0.1:25432/appdb"),
            ("postgres://app:S3cret@a:26432,b:26433/db", "postgres://app@a:26432,b:26433/db"),
            ("hostaddr=127.0.0.1 port=26432 dbname=db user=app password=S3cret", "postgres://app@127.0.0.1:26432/db"),
        ] {
            assert_eq!(redacted(address), shown, "{address:?}");
        }
    }

    #[tokio::test]
    async fn refusals_name_the_problem_and_never_the_password() {
        for (address, says) in [
            ("postgres://app:p@ss@127.0.0.1:25432/appdb", "%40"),
            ("postgres://app:S3cret@127.0.0.1/db?sslmode=require", "sslmode"),
            ("postgres://app:S3cret@127.0.0.1/db?sslmode=verify-full", "verify-full"),
            ("host=127.0.0.1 password=S3cret sslmode=verify-ca", "verify-ca"),
            ("postgres://app:S3cret@127.0.0.1:99999/db", "cannot be read"),
        ] {
            let said = PgStore::connect(address, PgOptions::default()).await.expect_err(address).to_string();
            assert!(said.contains(says), "{address:?}: {said}");
            assert!(!said.contains("S3cret") && !said.contains("ss@"), "{address:?}: {said}");
        }
    }
}
