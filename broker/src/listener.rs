//! The broker's TCP listener: every accepted connection takes a place among those that have not sent
//! their first request yet ([`crate::admission`], in all and per address, a newer one taking the
//! longest-waiting one's place, new ones per address rate-limited) and must send that request's
//! headers within the handshake timeout ([`crate::guard`]). So connections that never speak, or
//! speak one byte at a time, cost a bounded number of file descriptors and keep no one out.
//!
//! With TLS, each accepted connection's TLS handshake runs in a task of its own (within the same
//! place and deadline), so a slow or silent client never holds up the accept loop.

use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

use crate::admission::Admission;
use crate::guard::{Guarded, Rules};

/// How long a failing accept (out of file descriptors, say) waits before the next try.
const ACCEPT_RETRY: Duration = Duration::from_millis(50);
const ACCEPT_WARN_EVERY: Duration = Duration::from_secs(10);

pub struct GuardedListener {
    inner: TcpListener,
    admission: Arc<Admission>,
    header_timeout: Duration,
    warned: Option<tokio::time::Instant>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// TLS handshakes under way; each yields its connection, or nothing when it failed.
    handshakes: JoinSet<Option<(Guarded<Conn>, SocketAddr)>>,
}

impl GuardedListener {
    pub fn new(inner: TcpListener, admission: Arc<Admission>, header_timeout: Duration) -> GuardedListener {
        GuardedListener { inner, admission, header_timeout, warned: None, tls: None, handshakes: JoinSet::new() }
    }

    /// Connections speak TLS first (`wss://`, `https://`).
    pub fn with_tls(mut self, tls: Option<tokio_rustls::TlsAcceptor>) -> GuardedListener {
        self.tls = tls;
        self
    }
}

/// A connection to the broker's port: plain TCP, or TLS over it.
pub enum Conn {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write(cx, data),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, data),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Conn::Plain(s) => s.is_write_vectored(),
            Conn::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_flush(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Conn::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Conn::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Runs a TLS handshake within the connection's header deadline; a newer connection taking its
/// place ends it too.
async fn tls_handshake(
    acceptor: tokio_rustls::TlsAcceptor,
    stream: TcpStream,
    from: SocketAddr,
    pending: crate::admission::Pending,
    header_timeout: Duration,
) -> Option<(Guarded<Conn>, SocketAddr)> {
    let started = tokio::time::Instant::now();
    let mut eviction = pending.eviction();
    let tls = tokio::select! {
        done = tokio::time::timeout(header_timeout, acceptor.accept(stream)) => match done {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => {
                tracing::debug!(%from, error = %e, "TLS handshake failed");
                return None;
            }
            Err(_) => {
                tracing::debug!(%from, "no TLS handshake in time");
                return None;
            }
        },
        () = &mut eviction => return None,
    };
    let rules = Rules {
        header_timeout: header_timeout.saturating_sub(started.elapsed()),
        idle_timeout: None,
        release_at_headers: true,
    };
    Some((Guarded::new(Conn::Tls(Box::new(tls)), Box::new(pending), rules, Some(eviction)), from))
}

impl axum::serve::Listener for GuardedListener {
    type Io = Guarded<Conn>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let accepted = tokio::select! {
                Some(done) = self.handshakes.join_next(), if !self.handshakes.is_empty() => {
                    if let Ok(Some(ready)) = done {
                        return ready;
                    }
                    continue;
                }
                accepted = self.inner.accept() => accepted,
            };
            let (stream, from) = match accepted {
                Ok(accepted) => accepted,
                Err(e) => {
                    if self.warned.is_none_or(|at| at.elapsed() >= ACCEPT_WARN_EVERY) {
                        tracing::warn!(error = %e, "accepting a connection failed; new ones wait (logged at most every 10 s)");
                        self.warned = Some(tokio::time::Instant::now());
                    }
                    tokio::time::sleep(ACCEPT_RETRY).await;
                    continue;
                }
            };
            let pending = match self.admission.admit(from.ip()) {
                Ok(p) => p,
                Err(why) => {
                    tracing::debug!(%from, why, "connection closed before its request");
                    continue;
                }
            };
            // Frames are small and often follow one another (accepted, then deliver): without
            // TCP_NODELAY the second waits for the peer's delayed ACK, up to 40 ms per hop.
            if let Err(e) = stream.set_nodelay(true) {
                tracing::debug!(error = %e, "could not set TCP_NODELAY");
            }
            if let Some(acceptor) = &self.tls {
                self.handshakes.spawn(tls_handshake(acceptor.clone(), stream, from, pending, self.header_timeout));
                continue;
            }
            let eviction = Some(pending.eviction());
            let rules = Rules { header_timeout: self.header_timeout, idle_timeout: None, release_at_headers: true };
            return (Guarded::new(Conn::Plain(stream), Box::new(pending), rules, eviction), from);
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.inner.local_addr()
    }
}

/// The address a connection came from, as handlers extract it (`ConnectInfo<Remote>`).
#[derive(Clone, Copy, Debug)]
pub struct Remote(pub SocketAddr);

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, GuardedListener>> for Remote {
    fn connect_info(stream: axum::serve::IncomingStream<'_, GuardedListener>) -> Remote {
        Remote(*stream.remote_addr())
    }
}
