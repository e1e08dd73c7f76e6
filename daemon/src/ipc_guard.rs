//! What one IPC connection may hold: a place among a bounded number of connections (a client that
//! cannot get one waits in the kernel's backlog; the connections already open are served on), its
//! request headers within 10 s of connecting, and no more than 11 minutes without a byte either way
//! (longer than the longest long-poll, 10 minutes; an event stream sends a keep-alive every 15 s).

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use interprocess::local_socket::tokio::Stream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{Instant, Sleep};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 256;
/// From connecting to the end of the first request's headers.
pub const HEADER_TIMEOUT: Duration = Duration::from_secs(10);
/// With nothing read or written.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(11 * 60);

/// An accepted connection with its place and its deadlines.
pub struct GuardedStream {
    inner: Stream,
    _place: OwnedSemaphorePermit,
    /// Whether the first request's headers are in (the last bytes seen, to find `\r\n\r\n` across reads).
    headers_in: bool,
    tail: Vec<u8>,
    deadline: Pin<Box<Sleep>>,
}

impl GuardedStream {
    pub fn new(inner: Stream, place: OwnedSemaphorePermit) -> GuardedStream {
        GuardedStream {
            inner,
            _place: place,
            headers_in: false,
            tail: Vec::with_capacity(4),
            deadline: Box::pin(tokio::time::sleep(HEADER_TIMEOUT)),
        }
    }

    fn saw(&mut self, bytes: &[u8]) {
        if !self.headers_in {
            let mut window = std::mem::take(&mut self.tail);
            window.extend_from_slice(bytes);
            self.headers_in = window.windows(4).any(|w| w == b"\r\n\r\n");
            let keep = window.len().saturating_sub(3);
            self.tail = window.split_off(keep);
        }
        self.active();
    }

    /// Something moved: the idle deadline starts again (the header deadline stands until they are in).
    fn active(&mut self) {
        if self.headers_in {
            self.deadline.as_mut().reset(Instant::now() + IDLE_TIMEOUT);
        }
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        self.deadline.as_mut().poll(cx).is_ready().then(|| {
            let what = if self.headers_in { "idle too long" } else { "no request headers in time" };
            io::Error::new(io::ErrorKind::TimedOut, what)
        })
    }
}

impl AsyncRead for GuardedStream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let got = buf.filled()[before..].to_vec();
                self.saw(&got);
                Poll::Ready(Ok(()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => match self.expired(cx) {
                Some(e) => Poll::Ready(Err(e)),
                None => Poll::Pending,
            },
        }
    }
}

impl AsyncWrite for GuardedStream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, data);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.active();
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}
