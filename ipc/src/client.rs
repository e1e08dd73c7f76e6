//! The IPC client: one HTTP/1.1 request per connection to the daemon's socket.

use std::path::PathBuf;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;
use interprocess::local_socket::tokio::Stream;
use interprocess::local_socket::traits::tokio::Stream as _;
use interprocess::local_socket::{GenericFilePath, ToFsName};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::api::{ApiError, ApiErrorBody, ApiErrorCode};
use crate::{Home, IPC_VERSION, VERSION_HEADER};

#[derive(Debug, thiserror::Error)]
pub enum IpcError {
    /// No daemon answers on the socket.
    #[error("the mesh daemon is not running (no answer on {socket}); start it with `mesh daemon up`")]
    Unreachable {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The daemon answered with an error.
    #[error("{}", .error.message)]
    Api { status: u16, error: ApiError },
    /// The daemon answered something that is not this contract.
    #[error("unexpected answer from the daemon: {0}")]
    Protocol(String),
}

impl IpcError {
    pub fn code(&self) -> Option<ApiErrorCode> {
        match self {
            IpcError::Api { error, .. } => Some(error.code),
            _ => None,
        }
    }

    /// The daemon's error answer, when that is what this is.
    pub fn api(&self) -> Option<&ApiError> {
        match self {
            IpcError::Api { error, .. } => Some(error),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct IpcClient {
    socket: PathBuf,
    bearer: Option<String>,
    as_session: Option<String>,
}

impl IpcClient {
    pub fn new(home: &Home) -> IpcClient {
        IpcClient { socket: home.socket_path(), bearer: None, as_session: None }
    }

    /// Sends `Authorization: Bearer <token>` on every request (a session's token).
    pub fn with_bearer(mut self, token: Option<String>) -> IpcClient {
        self.bearer = token;
        self
    }

    /// With the member's bearer token: act as the session whose key this is.
    pub fn as_session(mut self, key: Option<String>) -> IpcClient {
        self.as_session = key;
        self
    }

    pub fn socket(&self) -> &std::path::Path {
        &self.socket
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, IpcError> {
        self.call(Method::GET, path, None::<&()>).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, IpcError> {
        self.call(Method::POST, path, Some(body)).await
    }

    pub async fn put<B: Serialize, T: DeserializeOwned>(&self, path: &str, body: &B) -> Result<T, IpcError> {
        self.call(Method::PUT, path, Some(body)).await
    }

    /// `GET path?query` with `query` serialised as URL parameters.
    pub async fn get_query<Q: Serialize, T: DeserializeOwned>(&self, path: &str, query: &Q) -> Result<T, IpcError> {
        let query = serde_urlencoded::to_string(query).map_err(|e| IpcError::Protocol(e.to_string()))?;
        let uri = if query.is_empty() { path.to_owned() } else { format!("{path}?{query}") };
        self.get(&uri).await
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<T, IpcError> {
        let body = match body {
            Some(b) => serde_json::to_vec(b).map_err(|e| IpcError::Protocol(e.to_string()))?,
            None => Vec::new(),
        };
        let (status, bytes) = self.raw(method, path, body).await?;
        if status.is_success() {
            return serde_json::from_slice(&bytes)
                .map_err(|e| IpcError::Protocol(format!("{path}: {e}: {}", String::from_utf8_lossy(&bytes))));
        }
        match serde_json::from_slice::<ApiErrorBody>(&bytes) {
            Ok(b) => Err(IpcError::Api { status: status.as_u16(), error: b.error }),
            Err(_) => Err(IpcError::Protocol(format!("HTTP {status}: {}", String::from_utf8_lossy(&bytes)))),
        }
    }

    /// Sends one request with a raw body and returns the status and body bytes.
    pub async fn raw(&self, method: Method, path: &str, body: Vec<u8>) -> Result<(StatusCode, Bytes), IpcError> {
        let unreachable = |source| IpcError::Unreachable { socket: self.socket.clone(), source };
        let name = self.socket.as_path().to_fs_name::<GenericFilePath>().map_err(unreachable)?;
        let stream = Stream::connect(name).await.map_err(unreachable)?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| IpcError::Protocol(e.to_string()))?;
        let conn = tokio::spawn(conn);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "localhost")
            .header(VERSION_HEADER, IPC_VERSION.to_string());
        if !body.is_empty() {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(token) = &self.bearer {
            req = req.header(header::AUTHORIZATION, format!("Bearer {token}"));
        }
        if let Some(key) = &self.as_session {
            req = req.header(crate::AS_SESSION_HEADER, key);
        }
        let req = req.body(Full::new(Bytes::from(body))).map_err(|e| IpcError::Protocol(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(|e| {
            if e.is_incomplete_message() || e.is_closed() || e.is_canceled() {
                // The daemon went away in the middle: as unreachable as if it had never answered.
                unreachable(std::io::Error::new(
                    std::io::ErrorKind::ConnectionAborted,
                    format!("the daemon closed the connection before answering ({e})"),
                ))
            } else {
                IpcError::Protocol(format!("request failed: {e}"))
            }
        })?;
        let status = resp.status();
        let bytes = resp.into_body().collect().await.map_err(|e| IpcError::Protocol(e.to_string()))?.to_bytes();
        conn.abort();
        Ok((status, bytes))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn no_daemon_is_unreachable() {
        let dir = tempfile::tempdir().expect("tempdir");
        let client = IpcClient::new(&Home::at(dir.path()));
        let err = client.get::<serde_json::Value>(crate::routes::VERSION).await.expect_err("nobody listens");
        assert!(matches!(err, IpcError::Unreachable { .. }), "{err}");
    }
}
