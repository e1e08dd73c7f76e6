//! A protocol-level peer: a client of the broker written from `docs/protocol.md`, with no daemon in
//! between, so many peers fit in one benchmark process.

use std::sync::Arc;

use anyhow::{Context, bail};
use futures_util::{SinkExt, StreamExt};
use mesh_proto::crypto::GroupKey;
use mesh_proto::invite::{InviteParams, InviteToken};
use mesh_proto::message::{self, Content, SealKey};
use mesh_proto::signed::Signed;
use mesh_proto::wire::{self, ClientFrame, Hello, HelloClaims, Intent, Role, SendMessage, ServerFrame, Welcome};
use mesh_proto::{Identity, MeshId, Target, codec, now_ms};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};

pub type Ws = WebSocketStream<MaybeTlsStream<TcpStream>>;

/// A broker's address, and for `wss://` the client configuration that trusts it.
#[derive(Clone, Debug)]
pub struct Endpoint {
    pub url: String,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// A TLS client configuration whose only authority is the (self-signed) certificate in `pem`.
pub fn trusting(pem: &std::path::Path) -> anyhow::Result<Arc<rustls::ClientConfig>> {
    use rustls::pki_types::CertificateDer;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(pem)? {
        roots.add(cert?)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// Connects and completes the handshake.
pub async fn connect(
    endpoint: &Endpoint,
    mesh: MeshId,
    id: &Identity,
    name: &str,
    intent: impl FnOnce(&[u8]) -> Intent,
) -> anyhow::Result<(Ws, Welcome)> {
    let connector = match &endpoint.tls {
        Some(config) => tokio_tungstenite::Connector::Rustls(config.clone()),
        None => tokio_tungstenite::Connector::Plain,
    };
    let url = format!("{}{}", endpoint.url, wire::WS_PATH);
    let (mut ws, _) = tokio_tungstenite::connect_async_tls_with_config(url, None, true, Some(connector))
        .await
        .context("connecting")?;
    let challenge = match next(&mut ws).await? {
        ServerFrame::Challenge(c) => c.nonce,
        other => bail!("expected a challenge, got {other:?}"),
    };
    let public = id.public();
    let claims = HelloClaims {
        v: 1,
        challenge: codec::b64(&challenge),
        mesh_id: mesh,
        key: public.key,
        enc_key: public.enc_key,
        enc_sig: public.enc_sig,
        name: name.to_owned(),
        client: "mesh-bench".into(),
        at: now_ms(),
        intent: intent(&challenge),
        attestation: None,
    };
    let hello = ClientFrame::Hello(Hello { v: 1, auth: Signed::sign(id, &claims) });
    ws.send(Message::Text(hello.to_json().into())).await?;
    match next(&mut ws).await? {
        ServerFrame::Welcome(w) => Ok((ws, w)),
        other => bail!("handshake refused: {other:?}"),
    }
}

async fn next(ws: &mut Ws) -> anyhow::Result<ServerFrame> {
    loop {
        match ws.next().await.context("connection closed")?? {
            Message::Text(t) => return wire::decode_server(&t).map_err(|e| anyhow::anyhow!(e.detail)),
            Message::Close(_) => bail!("connection closed"),
            _ => continue,
        }
    }
}

/// A mesh of `n` peers, every one connected, peer `i` to `endpoints[i % len]` (replicas of one
/// database; one broker when there is one): the first created it, the others joined with one invite. Returns the mesh, its group key and each peer's identity and socket.
pub async fn mesh_of(endpoints: &[Endpoint], n: usize) -> anyhow::Result<(MeshId, GroupKey, Vec<(Identity, Ws)>)> {
    let endpoint = endpoints.first().context("no broker")?;
    let mesh = MeshId::generate();
    let group_key = GroupKey::generate();
    let owner = Identity::generate();
    let (ws, _) =
        connect(endpoint, mesh, &owner, "peer-0", |_| Intent::Create { mesh_name: "bench".into(), create_token: None })
            .await?;
    let params = InviteParams {
        mesh_id: mesh,
        mesh_name: "bench".into(),
        broker_url: endpoint.url.clone(),
        tls_pin: None,
        role: Role::Member,
        issued_at: now_ms(),
        expires_at: now_ms() + 3_600_000,
        max_uses: None,
        key_epoch: 0,
    };
    let invite = Arc::new(InviteToken::mint(&owner, params, &group_key));
    let mut peers = vec![(owner, ws)];
    let mut joins = tokio::task::JoinSet::new();
    for i in 1..n {
        let (endpoint, invite) = (endpoints[i % endpoints.len()].clone(), invite.clone());
        joins.spawn(async move {
            let id = Identity::generate();
            let key = id.key();
            let (ws, _) = connect(&endpoint, mesh, &id, &format!("peer-{i}"), |challenge| Intent::Join {
                invite: invite.invite.clone(),
                proof: invite.prove(challenge, &key),
            })
            .await?;
            anyhow::Ok((i, id, ws))
        });
    }
    let mut joined: Vec<(usize, Identity, Ws)> = Vec::with_capacity(n);
    while let Some(r) = joins.join_next().await {
        joined.push(r??);
    }
    joined.sort_by_key(|(i, _, _)| *i);
    peers.extend(joined.into_iter().map(|(_, id, ws)| (id, ws)));
    Ok((mesh, group_key, peers))
}

/// A `send` frame (request `id`) of `body` from `from` to `target`, sealed with `key`, as JSON, and
/// the size of its ciphertext.
pub fn send_frame(
    from: &Identity,
    mesh: MeshId,
    id: u64,
    cmid: String,
    target: Target,
    key: SealKey<'_>,
    body: String,
) -> (String, usize) {
    let sealed = message::seal(from, &mesh, &cmid, &target, key, &Content { body, reply_to: None });
    let size = sealed.ciphertext.len();
    let frame = ClientFrame::Send(SendMessage {
        id,
        client_message_id: cmid,
        to: target,
        nonce: sealed.nonce,
        ciphertext: sealed.ciphertext,
        sig: sealed.sig,
        ttl_ms: None,
        key_epoch: None,
    });
    (frame.to_json(), size)
}

/// Splits a socket into a writer task fed by a channel and the read half.
pub fn split(ws: Ws) -> (mpsc::Sender<String>, futures_util::stream::SplitStream<Ws>) {
    let (mut sink, stream) = ws.split();
    let (tx, mut rx) = mpsc::channel::<String>(1024);
    tokio::spawn(async move {
        while let Some(text) = rx.recv().await {
            if sink.send(Message::Text(text.into())).await.is_err() {
                break;
            }
        }
    });
    (tx, stream)
}
