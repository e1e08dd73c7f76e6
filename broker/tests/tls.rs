//! TLS on the broker's port: handshakes run beside the accept loop, never in it.

use std::sync::Arc;
use std::time::Duration;

use mesh_broker::tls::ServerTls;
use mesh_broker::{BrokerConfig, Extras, SqliteStore};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);

/// `GET /health` over TLS, trusting only `cert`.
async fn health(addr: std::net::SocketAddr, cert: &std::path::Path) -> String {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(CertificateDer::from_pem_file(cert).expect("cert")).expect("root");
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let tcp = TcpStream::connect(addr).await.expect("connect");
    let name = ServerName::try_from("localhost").expect("name");
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config)).connect(name, tcp).await.expect("TLS handshake");
    tls.write_all(b"GET /health HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").await.expect("request");
    let mut answer = String::new();
    tls.read_to_string(&mut answer).await.expect("answer");
    answer
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_that_stall_their_tls_handshake_hold_up_no_one() {
    let dir = tempfile::tempdir().expect("dir");
    let tls = Arc::new(ServerTls::self_signed(dir.path(), &["localhost".into()]).expect("certificate"));
    let store = Arc::new(SqliteStore::open(&dir.path().join("broker.db")).expect("store"));
    // Stalled handshakes would hold an accept loop for this long.
    let config = BrokerConfig { handshake_timeout: Duration::from_secs(3600), ..BrokerConfig::default() };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let shutdown = CancellationToken::new();
    let extras = Extras { metrics: None, tls: Some(tls.clone()) };
    let served = tokio::spawn(mesh_broker::run_with(listener, store, config, shutdown.clone(), extras));

    // Clients that start a ClientHello (a record header announcing 512 bytes) and send no more.
    let mut stalled = Vec::new();
    for _ in 0..8 {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(&[0x16, 0x03, 0x01, 0x02, 0x00]).await.expect("half a hello");
        stalled.push(tcp);
    }
    let answer = tokio::time::timeout(WAIT, health(addr, tls.cert_path())).await.expect("answered beside them");
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"status\":\"ok\""), "{answer}");

    drop(stalled);
    shutdown.cancel();
    served.await.expect("task").expect("served");
}
