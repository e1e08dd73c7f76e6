//! What a connection that has not sent its first request may cost: a place among a bounded number
//! (held until its request's headers are in, or for its whole life), a deadline for those headers, an
//! optional idle deadline after them, and an eviction signal that closes it when a newer connection
//! takes its place. Used by the broker's TCP listener and the daemon's IPC socket.

use std::any::Any;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::{Instant, Sleep};

/// A place, kept alive by the connection (a semaphore permit, an admission).
pub type Place = Box<dyn Any + Send>;

/// Resolves when the connection must close (a newer one took its place).
pub type Eviction = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How a [`Guarded`] connection is held.
pub struct Rules {
    /// From connecting to the end of the first request's headers.
    pub header_timeout: Duration,
    /// With nothing read or written, once the headers are in; `None`: no limit here.
    pub idle_timeout: Option<Duration>,
    /// Give the place back once the headers are in (else hold it for the connection's life).
    pub release_at_headers: bool,
}

pub struct Guarded<S> {
    inner: S,
    place: Option<Place>,
    rules: Rules,
    /// Whether the first request's headers are in (the last bytes seen, to find `\r\n\r\n` across reads).
    headers_in: bool,
    tail: Vec<u8>,
    deadline: Pin<Box<Sleep>>,
    eviction: Option<Eviction>,
}

impl<S> Guarded<S> {
    pub fn new(inner: S, place: Place, rules: Rules, eviction: Option<Eviction>) -> Guarded<S> {
        let deadline = Box::pin(tokio::time::sleep(rules.header_timeout));
        Guarded { inner, place: Some(place), rules, headers_in: false, tail: Vec::with_capacity(4), deadline, eviction }
    }

    pub fn get_ref(&self) -> &S {
        &self.inner
    }

    fn saw(&mut self, bytes: &[u8]) {
        if !self.headers_in {
            let mut window = std::mem::take(&mut self.tail);
            window.extend_from_slice(bytes);
            self.headers_in = window.windows(4).any(|w| w == b"\r\n\r\n");
            let keep = window.len().saturating_sub(3);
            self.tail = window.split_off(keep);
            if self.headers_in {
                // Past its first request, the connection is the protocol's to govern.
                self.eviction = None;
                if self.rules.release_at_headers {
                    self.place = None;
                }
            }
        }
        self.active();
    }

    /// Something moved: the idle deadline starts again (the header deadline stands until they are in).
    fn active(&mut self) {
        if self.headers_in {
            let idle = self.rules.idle_timeout.unwrap_or(Duration::from_secs(u32::MAX.into()));
            self.deadline.as_mut().reset(Instant::now() + idle);
        }
    }

    fn expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        if let Some(eviction) = self.eviction.as_mut()
            && eviction.as_mut().poll(cx).is_ready()
        {
            return Some(io::Error::new(io::ErrorKind::ConnectionAborted, "a newer connection took this one's place"));
        }
        if self.headers_in && self.rules.idle_timeout.is_none() {
            return None;
        }
        self.deadline.as_mut().poll(cx).is_ready().then(|| {
            let what = if self.headers_in { "idle too long" } else { "no request headers in time" };
            io::Error::new(io::ErrorKind::TimedOut, what)
        })
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
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

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
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
