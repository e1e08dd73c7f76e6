//! The event stream client: `GET /v1/events` over the daemon's Unix socket, consumed with
//! `eventsource-client` (which parses SSE, reconnects with backoff and resumes with `Last-Event-ID`)
//! through a small transport that speaks HTTP/1.1 on the socket.

use std::path::PathBuf;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use eventsource_client::{Client as _, ClientBuilder, ReconnectOptions, SSE};
use futures_util::{Stream, StreamExt};
use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use interprocess::local_socket::tokio::Stream as LocalStream;
use interprocess::local_socket::traits::tokio::Stream as _;
use interprocess::local_socket::{GenericFilePath, ToFsName};
use launchdarkly_sdk_transport::{ByteStream, HttpTransport, Request, ResponseFuture, TransportError};
use tokio::sync::mpsc;

use crate::api::{Event, EventScope};
use crate::{IPC_VERSION, VERSION_HEADER, routes};

/// What a subscriber sees besides events.
#[derive(Debug)]
pub enum StreamItem {
    Event(Box<Event>),
    /// The stream (re)connected.
    Connected,
    /// The connection failed or ended; the client is reconnecting.
    Interrupted(String),
    /// The daemon refused the stream (bad token, say); it will not get better by retrying.
    Refused {
        status: u16,
        message: String,
    },
    /// A non-following stream caught up.
    End,
}

/// Follows the event stream of `scope` as `token`, from after `since` (or from now). With `follow`
/// false, the stream ends once it has caught up (and is not reconnected).
pub fn follow(
    socket: PathBuf,
    token: &str,
    scope: EventScope,
    since: Option<i64>,
    follow: bool,
) -> Result<impl Stream<Item = StreamItem> + Send + use<>, String> {
    let scope = match scope {
        EventScope::Own => "self",
        EventScope::All => "all",
    };
    let url = format!("http://localhost{}?scope={scope}&follow={follow}", routes::EVENTS);
    let mut builder = ClientBuilder::for_url(&url)
        .map_err(|e| e.to_string())?
        .header("authorization", &format!("Bearer {token}"))
        .map_err(|e| e.to_string())?
        .header(VERSION_HEADER, &IPC_VERSION.to_string())
        .map_err(|e| e.to_string())?
        .reconnect(
            ReconnectOptions::reconnect(follow)
                .retry_initial(true)
                .delay(Duration::from_millis(200))
                .backoff_factor(2)
                .delay_max(Duration::from_secs(5))
                .build(),
        );
    if let Some(id) = since {
        builder = builder.last_event_id(id.to_string());
    }
    let client = builder.build_with_transport(UnixTransport { socket });
    Ok(client
        .stream()
        .then(move |item| async move {
            match item {
                Ok(SSE::Event(e)) => match serde_json::from_str::<Event>(&e.data) {
                    Ok(ev) => StreamItem::Event(Box::new(ev)),
                    Err(err) => StreamItem::Interrupted(format!("undecodable event {:?}: {err}", e.event_type)),
                },
                Ok(SSE::Connected(_) | SSE::Comment(_)) => StreamItem::Connected,
                Err(eventsource_client::Error::UnexpectedResponse(resp, body)) if resp.status() < 500 => {
                    StreamItem::Refused { status: resp.status(), message: error_message(body.into_stream()).await }
                }
                Err(eventsource_client::Error::Eof) if !follow => StreamItem::End,
                Err(e) => StreamItem::Interrupted(e.to_string()),
            }
        })
        .take_while(|item| std::future::ready(!matches!(item, StreamItem::End))))
}

/// The daemon's error message from an error response body (its first few KiB).
async fn error_message(mut body: ByteStream) -> String {
    let mut bytes = Vec::new();
    while let Some(Ok(chunk)) = body.next().await {
        bytes.extend_from_slice(&chunk);
        if bytes.len() > 16 * 1024 {
            break;
        }
    }
    match serde_json::from_slice::<crate::api::ApiErrorBody>(&bytes) {
        Ok(b) => b.error.message,
        Err(_) => String::from_utf8_lossy(&bytes).into_owned(),
    }
}

/// HTTP/1.1 over the daemon's Unix socket, for `eventsource-client`.
#[derive(Clone)]
struct UnixTransport {
    socket: PathBuf,
}

/// A response body as a `Sync` stream of chunks (the transport's contract), fed by a task.
struct ChunkStream(mpsc::Receiver<Result<Bytes, TransportError>>);

impl Stream for ChunkStream {
    type Item = Result<Bytes, TransportError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.0.poll_recv(cx)
    }
}

impl HttpTransport for UnixTransport {
    fn request(&self, request: Request<Option<Bytes>>) -> ResponseFuture {
        let socket = self.socket.clone();
        let call = tokio::spawn(async move {
            let io_err = |e: std::io::Error| TransportError::new(e);
            let name = socket.as_path().to_fs_name::<GenericFilePath>().map_err(io_err)?;
            let stream = LocalStream::connect(name).await.map_err(io_err)?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.map_err(TransportError::new)?;
            tokio::spawn(conn);
            let (mut parts, body) = request.into_parts();
            // Origin-form on the wire; the socket is the authority.
            let path = parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
            parts.uri = path.parse().map_err(TransportError::new)?;
            parts.headers.insert(hyper::header::HOST, hyper::header::HeaderValue::from_static("localhost"));
            let req = hyper::Request::from_parts(parts, Full::new(body.unwrap_or_default()));
            let resp = sender.send_request(req).await.map_err(TransportError::new)?;
            let (parts, mut incoming) = resp.into_parts();
            let (tx, rx) = mpsc::channel(16);
            tokio::spawn(async move {
                while let Some(frame) = incoming.frame().await {
                    let item = match frame {
                        Ok(f) => match f.into_data() {
                            Ok(data) => Ok(data),
                            Err(_) => continue,
                        },
                        Err(e) => Err(TransportError::new(e)),
                    };
                    let failed = item.is_err();
                    if tx.send(item).await.is_err() || failed {
                        break;
                    }
                }
            });
            let body: ByteStream = Box::pin(ChunkStream(rx));
            Ok(hyper::Response::from_parts(parts, body))
        });
        Box::pin(async move { call.await.map_err(TransportError::new)? })
    }
}
