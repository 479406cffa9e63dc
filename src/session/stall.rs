//! A writer that gives up on a peer that stops reading.
//!
//! Back-pressure keeps a session that stops reading its result in bounded memory (the proxy stops
//! reading the upstream, and Postgres blocks in its own send), but it would hold the upstream
//! backend, its locks and snapshot, forever. [`StallLimit`] fails a write that has made no
//! progress for the limit with [`ClientStalled`], and the session ends (its statement cancelled).
//! The timer is armed only while the socket is full: the common path costs nothing.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::AsyncWrite;
use tokio::time::{Instant, Sleep};

/// The error inside the `io::Error` of a stalled write.
#[derive(Debug, thiserror::Error)]
#[error("the client accepted no data for {}", crate::time::human_duration(*.0))]
pub struct ClientStalled(pub Duration);

impl ClientStalled {
    /// The stall behind an I/O error, if that is what it is.
    pub fn of(e: &io::Error) -> Option<&ClientStalled> {
        e.get_ref().and_then(|inner| inner.downcast_ref::<ClientStalled>())
    }
}

pub struct StallLimit<W> {
    inner: W,
    limit: Option<Duration>,
    /// Running while the writer is blocked; reused across stalls.
    timer: Option<Pin<Box<Sleep>>>,
    armed: bool,
}

impl<W> StallLimit<W> {
    /// `limit: None` never gives up.
    pub fn new(inner: W, limit: Option<Duration>) -> Self {
        Self { inner, limit, timer: None, armed: false }
    }

    fn progress(&mut self) {
        self.armed = false;
    }

    /// Called when the inner writer is blocked: `Ready(Err)` once blocked for the whole limit.
    fn poll_stall(&mut self, cx: &mut Context<'_>) -> Poll<io::Error> {
        let Some(limit) = self.limit else { return Poll::Pending };
        let deadline = Instant::now() + limit;
        let timer = self.timer.get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        if !self.armed {
            timer.as_mut().reset(deadline);
            self.armed = true;
        }
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(io::Error::new(io::ErrorKind::TimedOut, ClientStalled(limit))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl<W: AsyncWrite + Unpin> AsyncWrite for StallLimit<W> {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_write(cx, buf) {
            Poll::Ready(r) => {
                this.progress();
                Poll::Ready(r)
            }
            Poll::Pending => this.poll_stall(cx).map(Err),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        match Pin::new(&mut this.inner).poll_flush(cx) {
            Poll::Ready(r) => {
                this.progress();
                Poll::Ready(r)
            }
            Poll::Pending => this.poll_stall(cx).map(Err),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn a_reader_that_stops_fails_the_write_after_the_limit_and_one_that_reads_never_does() {
        let (a, mut b) = tokio::io::duplex(64);
        let mut w = StallLimit::new(a, Some(Duration::from_secs(60)));
        // A slow but steady reader: 64 bytes every 50 s, never 60 s without progress.
        let reader = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            for _ in 0..4 {
                tokio::time::sleep(Duration::from_secs(50)).await;
                b.read_exact(&mut buf).await.unwrap();
            }
            b // then it stops reading
        });
        w.write_all(&[7u8; 64 * 5]).await.expect("progress every 50 s is enough");
        let _b = reader.await.unwrap();
        let started = Instant::now();
        let e = w.write_all(&[7u8; 64]).await.expect_err("nobody reads any more");
        assert!(ClientStalled::of(&e).is_some(), "{e}");
        assert_eq!(started.elapsed(), Duration::from_secs(60));
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_limit_a_blocked_write_just_waits() {
        let (a, _b) = tokio::io::duplex(8);
        let mut w = StallLimit::new(a, None);
        let blocked = tokio::time::timeout(Duration::from_secs(3600), w.write_all(&[0u8; 64])).await;
        assert!(blocked.is_err(), "still waiting after an hour");
    }
}
