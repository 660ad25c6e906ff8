//! A deadline for every request head of a connection. actix-http times only the first
//! (`client_request_timeout`): once a kept-alive connection has served a request, the first
//! byte of the next one clears its keep-alive timer and nothing times the rest, so a client
//! could send one byte of a head and then trickle, holding the connection (and its share of
//! the connection limits) without end. [`HeadDeadline`] sits between TLS and HTTP, sees the
//! plain bytes, and fails the read (which closes the connection) when a head has not ended
//! (`\r\n\r\n`) within the read timeout of its first byte. A response written ends the
//! request's turn; the body and the review have their own bounds in the handler.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};

/// Where a connection is in its request/response turn, as far as the head goes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
enum Phase {
    /// Waiting for a request (new connection, or a response went out).
    #[default]
    Idle,
    /// A head has begun; `matched` bytes of `\r\n\r\n` end what was read so far.
    Head { matched: usize },
    /// The head is complete: body and handler, until the response.
    Rest,
}

/// The head boundary, read byte by byte across reads.
#[derive(Debug, Default)]
pub(super) struct HeadScan {
    phase: Phase,
}

const END: &[u8; 4] = b"\r\n\r\n";

impl HeadScan {
    /// Bytes were read; `true` when they began a head.
    pub(super) fn read(&mut self, bytes: &[u8]) -> bool {
        if bytes.is_empty() {
            return false;
        }
        let began = self.phase == Phase::Idle;
        let mut matched = match self.phase {
            Phase::Rest => return false,
            Phase::Idle => 0,
            Phase::Head { matched } => matched,
        };
        for &b in bytes {
            matched = if END.get(matched) == Some(&b) {
                matched + 1
            } else if b == b'\r' {
                1
            } else {
                0
            };
            if matched == END.len() {
                self.phase = Phase::Rest;
                return began;
            }
        }
        self.phase = Phase::Head { matched };
        began
    }

    /// Bytes were written: the response began, the next read begins a new request.
    pub(super) fn wrote(&mut self) {
        self.phase = Phase::Idle;
    }

    pub(super) fn in_head(&self) -> bool {
        matches!(self.phase, Phase::Head { .. })
    }
}

/// `io` with a deadline on every request head (see the module docs). `on_timeout` runs
/// once, when a head is cut off.
pub struct HeadDeadline<T> {
    io: T,
    timeout: Duration,
    scan: HeadScan,
    deadline: Pin<Box<Sleep>>,
    on_timeout: Option<Box<dyn FnOnce() + Send>>,
}

impl<T> HeadDeadline<T> {
    pub fn new(io: T, timeout: Duration, on_timeout: impl FnOnce() + Send + 'static) -> Self {
        Self {
            io,
            timeout,
            scan: HeadScan::default(),
            deadline: Box::pin(tokio::time::sleep(timeout)),
            on_timeout: Some(Box::new(on_timeout)),
        }
    }

    pub fn get_ref(&self) -> &T {
        &self.io
    }

    fn timed_out(&mut self) -> io::Error {
        if let Some(report) = self.on_timeout.take() {
            report();
        }
        io::Error::new(
            io::ErrorKind::TimedOut,
            format!("request head not complete within {:?}", self.timeout),
        )
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for HeadDeadline<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = &mut *self;
        // A trickler's reads are always ready: look at the clock on each one.
        if this.scan.in_head() && this.deadline.is_elapsed() {
            return Poll::Ready(Err(this.timed_out()));
        }
        let before = buf.filled().len();
        match Pin::new(&mut this.io).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                let read = buf.filled().get(before..).unwrap_or_default();
                if this.scan.read(read) {
                    let at = Instant::now() + this.timeout;
                    this.deadline.as_mut().reset(at);
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending if this.scan.in_head() => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Err(this.timed_out())),
                Poll::Pending => Poll::Pending,
            },
            other => other,
        }
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for HeadDeadline<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.scan.wrote();
        }
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(written, Poll::Ready(Ok(n)) if n > 0) {
            self.scan.wrote();
        }
        written
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_head_ends_at_the_blank_line_whatever_the_reads() {
        let head = b"POST /mutate HTTP/1.1\r\nHost: w\r\nContent-Length: 2\r\n\r\n{}";
        for chunk in [1, 2, 3, 5, 64] {
            let mut scan = HeadScan::default();
            let mut began = 0;
            for part in head.chunks(chunk) {
                began += usize::from(scan.read(part));
            }
            assert_eq!(began, 1, "chunks of {chunk}");
            assert!(!scan.in_head(), "chunks of {chunk}: the head ended");
            // A body with a blank line in it changes nothing; the response ends the turn.
            assert!(!scan.read(b"\r\n\r\nx"));
            scan.wrote();
            assert!(!scan.in_head());
            // The next request on the kept-alive connection is a new head.
            assert!(scan.read(b"P"));
            assert!(scan.in_head());
        }
    }

    #[test]
    fn near_misses_of_the_blank_line_keep_the_head_open() {
        let mut scan = HeadScan::default();
        assert!(scan.read(b"GET / HTTP/1.1\r\n\r"));
        assert!(!scan.read(b"x\r\n\rX-A: b\r\n"));
        assert!(scan.in_head());
        assert!(!scan.read(b"\r\r\n\r\n"));
        assert!(!scan.in_head());
        assert!(!scan.read(b""));
    }
}
