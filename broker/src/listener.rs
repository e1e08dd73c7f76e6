//! The broker's TCP listener: every accepted connection takes a place among those that have not sent
//! their first request yet ([`crate::admission`], in all and per address, a newer one taking the
//! longest-waiting one's place, new ones per address rate-limited) and must send that request's
//! headers within the handshake timeout ([`crate::guard`]). So connections that never speak, or
//! speak one byte at a time, cost a bounded number of file descriptors and keep no one out.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};

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
}

impl GuardedListener {
    pub fn new(inner: TcpListener, admission: Arc<Admission>, header_timeout: Duration) -> GuardedListener {
        GuardedListener { inner, admission, header_timeout, warned: None }
    }
}

impl axum::serve::Listener for GuardedListener {
    type Io = Guarded<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        loop {
            let (stream, from) = match self.inner.accept().await {
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
            let eviction = Some(pending.eviction());
            let rules = Rules { header_timeout: self.header_timeout, idle_timeout: None, release_at_headers: true };
            return (Guarded::new(stream, Box::new(pending), rules, eviction), from);
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
