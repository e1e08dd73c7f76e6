//! A raw protocol client and an in-process broker for the broker's tests.
#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use mesh_broker::store::postgres::{PgOptions, PgStore};
use mesh_broker::{BrokerConfig, SqliteStore, Store};
use mesh_proto::attestation::SessionAttestation;
use mesh_proto::crypto::GroupKey;
use mesh_proto::invite::{InviteParams, InviteToken};
use mesh_proto::message::{self, Content, SealKey};
use mesh_proto::signed::Signed;
use mesh_proto::wire::{self, ClientFrame, ErrorCode, Hello, HelloClaims, Intent, Role, SendMessage, ServerFrame};
use mesh_proto::{Identity, MeshId, Target, codec, now_ms};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use tokio_util::sync::CancellationToken;

pub const WAIT: Duration = Duration::from_secs(10);

/// The store a test broker runs on.
#[derive(Clone, Debug)]
pub enum Backend {
    Sqlite,
    /// A database of its own on the tests' PostgreSQL server.
    Postgres(String),
}

impl Backend {
    /// A fresh PostgreSQL database, or `None` when there is none here (the test says it is skipped).
    pub fn postgres() -> Option<Backend> {
        mesh_testkit::postgres::database().map(Backend::Postgres)
    }
}

/// Each named test, `async fn NAME(backend: Backend)`, once on SQLite and once on PostgreSQL.
#[allow(unused_macros)]
macro_rules! on_both_stores {
    ($($case:ident),* $(,)?) => {
        mod on_sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    super::$case(crate::common::Backend::Sqlite).await;
                }
            )*
        }
        mod on_postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    if let Some(backend) = crate::common::Backend::postgres() {
                        super::$case(backend).await;
                    }
                }
            )*
        }
    };
}

pub struct TestBroker {
    pub addr: SocketAddr,
    pub db_path: std::path::PathBuf,
    backend: Backend,
    config: BrokerConfig,
    shutdown: CancellationToken,
    task: tokio::task::JoinHandle<std::io::Result<()>>,
    _dir: tempfile::TempDir,
}

impl TestBroker {
    pub async fn start(config: BrokerConfig) -> TestBroker {
        Self::start_on(&Backend::Sqlite, config).await
    }

    pub async fn start_on(backend: &Backend, config: BrokerConfig) -> TestBroker {
        Self::start_in(tempfile::tempdir().expect("tempdir"), backend.clone(), config).await
    }

    async fn start_in(dir: tempfile::TempDir, backend: Backend, config: BrokerConfig) -> TestBroker {
        let db_path = dir.path().join("broker.db");
        let store: Arc<dyn Store> = match &backend {
            Backend::Sqlite => Arc::new(SqliteStore::open(&db_path).expect("store opens")),
            Backend::Postgres(url) => {
                Arc::new(PgStore::connect(url, PgOptions { pool_size: 4 }).await.expect("store connects"))
            }
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(mesh_broker::run(listener, store, config.clone(), shutdown.clone()));
        TestBroker { addr, db_path, backend, config, shutdown, task, _dir: dir }
    }

    /// Stops the broker and starts another on the same database (on a new port).
    pub async fn restart(self) -> TestBroker {
        let (config, backend) = (self.config.clone(), self.backend.clone());
        let dir = self.stop().await;
        Self::start_in(dir, backend, config).await
    }

    pub fn url(&self) -> String {
        format!("ws://{}", self.addr)
    }

    /// Stops the broker; the returned directory keeps its database until dropped.
    pub async fn stop(self) -> tempfile::TempDir {
        self.shutdown.cancel();
        self.task.await.expect("broker task").expect("broker run");
        self._dir
    }
}

pub struct Client {
    pub ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    pub challenge: Vec<u8>,
}

impl Client {
    pub async fn connect(broker: &TestBroker) -> Client {
        let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{}{}", broker.addr, wire::WS_PATH))
            .await
            .expect("ws connect");
        let mut c = Client { ws, challenge: vec![] };
        match c.recv().await {
            ServerFrame::Challenge(ch) => c.challenge = ch.nonce,
            other => panic!("expected challenge, got {other:?}"),
        }
        c
    }

    pub async fn send_text(&mut self, text: &str) {
        self.ws.send(Message::Text(text.into())).await.expect("ws send");
    }

    pub async fn send(&mut self, frame: &ClientFrame) {
        self.send_text(&frame.to_json()).await;
    }

    /// The next protocol frame, failing the test after [`WAIT`].
    pub async fn recv(&mut self) -> ServerFrame {
        self.try_recv().await.expect("connection closed while waiting for a frame")
    }

    /// The next protocol frame, or `None` once the connection closes.
    pub async fn try_recv(&mut self) -> Option<ServerFrame> {
        loop {
            let msg = tokio::time::timeout(WAIT, self.ws.next()).await.expect("timed out waiting for a frame");
            match msg {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return None,
                Some(Ok(Message::Text(t))) => {
                    return Some(wire::decode_server(&t).expect("broker frames decode"));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// Skips presence frames.
    pub async fn recv_non_presence(&mut self) -> ServerFrame {
        loop {
            match self.recv().await {
                ServerFrame::Presence(_) => continue,
                other => return other,
            }
        }
    }

    pub async fn hello(&mut self, id: &Identity, mesh: MeshId, name: &str, intent: Intent) -> ServerFrame {
        let frame = hello_frame(&self.challenge, id, mesh, name, intent);
        self.send(&frame).await;
        self.recv().await
    }
}

pub fn hello_frame(challenge: &[u8], id: &Identity, mesh: MeshId, name: &str, intent: Intent) -> ClientFrame {
    signed_hello(id, &hello_claims(challenge, id, mesh, name, intent))
}

/// The claims of a `hello` from `id` answering `challenge`, without an attestation.
pub fn hello_claims(challenge: &[u8], id: &Identity, mesh: MeshId, name: &str, intent: Intent) -> HelloClaims {
    let public = id.public();
    HelloClaims {
        v: 1,
        challenge: codec::b64(challenge),
        mesh_id: mesh,
        key: public.key,
        enc_key: public.enc_key,
        enc_sig: public.enc_sig,
        name: name.to_owned(),
        client: "mesh-broker-tests".into(),
        at: now_ms(),
        intent,
        attestation: None,
    }
}

/// `claims` signed by `id` as a `hello` frame.
pub fn signed_hello(id: &Identity, claims: &HelloClaims) -> ClientFrame {
    ClientFrame::Hello(Hello { v: 1, auth: Signed::sign(id, claims) })
}

pub fn create_intent(name: &str) -> Intent {
    Intent::Create { mesh_name: name.to_owned(), create_token: None }
}

pub fn mint_invite(admin: &Identity, mesh: MeshId, url: &str, expires_at: u64, max_uses: Option<u32>) -> InviteToken {
    let params = InviteParams {
        mesh_id: mesh,
        mesh_name: "team".into(),
        broker_url: url.to_owned(),
        tls_pin: None,
        role: Role::Member,
        issued_at: now_ms(),
        expires_at,
        max_uses,
        key_epoch: 0,
    };
    InviteToken::mint(admin, params, &GroupKey::generate())
}

pub fn join_intent(token: &InviteToken, challenge: &[u8], joiner: &Identity) -> Intent {
    Intent::Join { invite: token.invite.clone(), proof: token.prove(challenge, &joiner.key()) }
}

/// A mesh with an owner `a` and a member `b`, both connected and welcomed.
pub struct TwoMembers {
    pub mesh: MeshId,
    pub a: Identity,
    pub b: Identity,
    pub ca: Client,
    pub cb: Client,
}

pub async fn two_members(broker: &TestBroker) -> TwoMembers {
    let (a, b) = (Identity::generate(), Identity::generate());
    let mesh = MeshId::generate();
    let mut ca = Client::connect(broker).await;
    assert!(matches!(ca.hello(&a, mesh, "alice", create_intent("team")).await, ServerFrame::Welcome(_)));
    let token = mint_invite(&a, mesh, &broker.url(), now_ms() + 60_000, None);
    let mut cb = Client::connect(broker).await;
    let intent = join_intent(&token, &cb.challenge.clone(), &b);
    assert!(matches!(cb.hello(&b, mesh, "bob", intent).await, ServerFrame::Welcome(_)));
    TwoMembers { mesh, a, b, ca, cb }
}

/// A send of `body` from `from` to `target`, sealed with `key`.
pub fn sealed_send(
    from: &Identity,
    mesh: MeshId,
    id: u64,
    cmid: &str,
    target: Target,
    key: SealKey<'_>,
    body: &str,
) -> SendMessage {
    let sealed = message::seal(from, &mesh, cmid, &target, key, &Content { body: body.into(), reply_to: None });
    SendMessage {
        id,
        client_message_id: cmid.into(),
        to: target,
        nonce: sealed.nonce,
        ciphertext: sealed.ciphertext,
        sig: sealed.sig,
        ttl_ms: None,
        key_epoch: None,
    }
}

pub fn dm(from: &Identity, mesh: MeshId, to: &Identity, id: u64, cmid: &str, body: &str) -> SendMessage {
    sealed_send(from, mesh, id, cmid, Target::Key(to.key()), SealKey::Direct(&to.enc_key()), body)
}

/// A broadcast from `from`, sealed under a throwaway group key (the broker never opens it).
pub fn broadcast(from: &Identity, mesh: MeshId, id: u64, cmid: &str, body: &str) -> SendMessage {
    sealed_send(from, mesh, id, cmid, Target::All, SealKey::Group(&GroupKey::generate()), body)
}

/// A hello for a session key carrying `attestation` (signed by `signer`).
pub fn session_hello(
    c: &Client,
    session: &Identity,
    mesh: MeshId,
    name: &str,
    signer: &Identity,
    att: SessionAttestation,
) -> ClientFrame {
    let claims = HelloClaims {
        attestation: Some(Signed::sign(signer, &att)),
        ..hello_claims(&c.challenge, session, mesh, name, Intent::Connect)
    };
    signed_hello(session, &claims)
}

/// Connects session `session` of `member` under `name`; returns the broker's answer to its hello.
pub async fn session_hello_answer(
    broker: &TestBroker,
    member: &Identity,
    session: &Identity,
    mesh: MeshId,
    name: &str,
) -> (Client, ServerFrame) {
    let mut c = Client::connect(broker).await;
    let now = now_ms();
    let att = SessionAttestation {
        v: 1,
        mesh_id: mesh,
        member: member.key(),
        session: session.key(),
        name: name.into(),
        issued_at: now,
        expires_at: now + 60_000,
    };
    let hello = session_hello(&c, session, mesh, name, member, att);
    c.send(&hello).await;
    let answer = c.recv().await;
    (c, answer)
}

/// Waits on `watcher` until `key` is announced online: its connection is registered then.
pub async fn registered(watcher: &mut Client, key: &Identity) {
    loop {
        if let ServerFrame::Presence(p) = watcher.recv().await
            && p.peer.key == key.key()
            && p.peer.online
        {
            return;
        }
    }
}

pub fn code_of(frame: &ServerFrame) -> Option<ErrorCode> {
    match frame {
        ServerFrame::Error(e) => Some(e.code),
        _ => None,
    }
}
