//! The relay's read buffers, lent per read instead of owned per session: a session waiting
//! for its peer holds none (plain sockets say when they are readable without a buffer to read
//! into), so an idle client costs no buffer memory, and a busy one takes a buffer that another
//! session just gave back instead of asking the allocator. One pool per thread (a session thread's
//! sessions stay on it; a TLS session's relay on tokio's threads may give a buffer back to
//! another thread's pool), bounded.
//!
//! TLS streams cannot say they are readable without reading: their sessions keep a buffer.

use std::{
    cell::{Cell, RefCell},
    io,
    task::{Context, Poll},
};

use bytes::BytesMut;
use tokio::{
    io::{AsyncRead, AsyncReadExt, Interest},
    net::{tcp, unix},
};
use tokio_util::either::Either;

/// Bytes asked of the socket per read when the buffer runs low.
pub const READ_CHUNK: usize = 16 * 1024;
/// Buffers kept for reuse per thread besides the last one given back (at most 2 × 16 KiB
/// each: one that grew past that for a large message goes back to the allocator).
const POOLED: usize = 128;

thread_local! {
    /// The buffer given back last, apart from the rest: a session's two directions take
    /// turns (the request is read and sent on, and its reader gives the buffer back just as
    /// the answer's reader takes one), so most takes find it here, a move in and out of a
    /// cell instead of a push and a pop through a borrowed vector (~100 instructions a
    /// transaction less).
    static LAST: Cell<Option<BytesMut>> = const { Cell::new(None) };
    static FREE: RefCell<Vec<BytesMut>> = const { RefCell::new(Vec::new()) };
}

/// A buffer with room for a read.
pub fn take() -> BytesMut {
    let mut buf = LAST
        .take()
        .or_else(|| FREE.with_borrow_mut(Vec::pop))
        .unwrap_or_else(|| BytesMut::with_capacity(READ_CHUNK));
    // An emptied buffer whose start was advanced gets its whole allocation back here, once
    // less than half of it is left (reclaiming at every read cost ~80 instructions a
    // transaction; `read_some` still asks for a whole chunk when under 1 KiB is left).
    if buf.capacity() < READ_CHUNK / 2 {
        buf.reserve(READ_CHUNK);
    }
    buf
}

/// Gives an empty buffer back (a non-empty one would lose bytes: it is kept by the caller).
pub fn give(buf: &mut BytesMut) {
    if !buf.is_empty() || buf.capacity() == 0 {
        return;
    }
    let buf = std::mem::take(buf);
    if buf.capacity() > 2 * READ_CHUNK {
        return;
    }
    if let Some(earlier) = LAST.replace(Some(buf)) {
        FREE.with_borrow_mut(|free| {
            if free.len() < POOLED {
                free.push(earlier);
            }
        });
    }
}

/// A read half that can wait until a read would not block, without a buffer to read into.
pub trait ReadReady: AsyncRead + Unpin {
    /// Whether this kind of stream can say so; TLS cannot (rustls reads to know), and its
    /// session keeps its buffer.
    fn tells_readiness(&self) -> bool;

    /// `Ready` once a read would not block (or would fail: the read then says how).
    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<()>;

    /// Reads what the socket holds now into `buf`, without a future (`WouldBlock` when it
    /// holds nothing after all); `None` for a stream that can only be read through one.
    fn try_read_now(&self, buf: &mut BytesMut) -> Option<io::Result<usize>>;
}

/// The read halves of plain sockets (TCP, Unix): they say when they are readable, and are
/// read without a future.
macro_rules! plain_read_half {
    ($half:ty) => {
        impl ReadReady for $half {
            fn tells_readiness(&self) -> bool {
                true
            }

            fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<()> {
                self.as_ref().poll_read_ready(cx).map(drop)
            }

            fn try_read_now(&self, buf: &mut BytesMut) -> Option<io::Result<usize>> {
                Some(read_clearing(
                    buf,
                    |buf| self.try_read_buf(buf),
                    || self.as_ref().try_io(Interest::READABLE, would_block),
                ))
            }
        }
    };
}

plain_read_half!(tcp::ReadHalf<'_>);
plain_read_half!(unix::ReadHalf<'_>);

/// Reads with `read`; when the read took less than there was room for, it emptied the
/// socket, and its readiness is cleared with `clear` (a `try_io` that fails with
/// [`would_block`]), as tokio's own read future does: the next wait then parks until the
/// socket says more came, instead of trying a read that fails with `EAGAIN` (half the reads
/// did, without this). Bytes that come after the read raise a new event, which the next
/// wait sees.
fn read_clearing(
    buf: &mut BytesMut,
    read: impl FnOnce(&mut BytesMut) -> io::Result<usize>,
    clear: impl FnOnce() -> io::Result<()>,
) -> io::Result<usize> {
    let room = buf.capacity() - buf.len();
    let read = read(buf);
    if matches!(read, Ok(n) if 0 < n && n < room) {
        let _ = clear();
    }
    read
}

/// What clears a socket's readiness through `try_io`.
fn would_block() -> io::Result<()> {
    Err(io::ErrorKind::WouldBlock.into())
}

impl<T: AsyncRead> ReadReady for tokio::io::ReadHalf<T> {
    fn tells_readiness(&self) -> bool {
        false
    }

    fn poll_readable(&self, _: &mut Context<'_>) -> Poll<()> {
        Poll::Ready(())
    }

    fn try_read_now(&self, _: &mut BytesMut) -> Option<io::Result<usize>> {
        None
    }
}

impl<L: ReadReady, R: ReadReady> ReadReady for Either<L, R> {
    fn tells_readiness(&self) -> bool {
        match self {
            Either::Left(l) => l.tells_readiness(),
            Either::Right(r) => r.tells_readiness(),
        }
    }

    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<()> {
        match self {
            Either::Left(l) => l.poll_readable(cx),
            Either::Right(r) => r.poll_readable(cx),
        }
    }

    fn try_read_now(&self, buf: &mut BytesMut) -> Option<io::Result<usize>> {
        match self {
            Either::Left(l) => l.try_read_now(buf),
            Either::Right(r) => r.try_read_now(buf),
        }
    }
}

/// Gives `buf` back while `stream` has nothing to read, then takes one for the read. A
/// buffer that still holds bytes (part of a frame) is kept, and so is a TLS stream's.
pub async fn read_ready<R: ReadReady>(stream: &R, buf: &mut BytesMut) {
    if buf.is_empty() && stream.tells_readiness() {
        give(buf);
        std::future::poll_fn(|cx| stream.poll_readable(cx)).await;
    }
    if buf.capacity() == 0 {
        *buf = take();
    }
}

/// Reads what `stream` has into `buf` (`Ok(0)`: the peer closed), holding no buffer while
/// it waits (see [`read_ready`]). A socket that says it is readable is read with one system
/// call and no future; the read future is the path of TLS streams only. Losing this future
/// loses nothing: bytes are only ever read into `buf`.
pub async fn read_some<R: ReadReady>(stream: &mut R, buf: &mut BytesMut) -> io::Result<usize> {
    loop {
        read_ready(stream, buf).await;
        if buf.capacity() - buf.len() < 1024 {
            buf.reserve(READ_CHUNK);
        }
        match stream.try_read_now(buf) {
            // Nothing after all (the readiness was stale; the failed read cleared it): wait
            // for the socket. `read_ready` waits only with an empty buffer (it gives it
            // back), so with part of a frame held the wait is made here: looping back
            // without one spun the worker, and every session on it stood still.
            Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => {
                if !buf.is_empty() {
                    std::future::poll_fn(|cx| stream.poll_readable(cx)).await;
                }
            }
            Some(read) => return read,
            None => return stream.read_buf(buf).await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_lent_and_given_back() {
        let mut a = take();
        assert!(a.capacity() >= READ_CHUNK);
        a.extend_from_slice(b"half a frame");
        give(&mut a);
        assert_eq!(&a[..], b"half a frame", "a buffer holding bytes is kept");
        a.clear();
        give(&mut a);
        assert_eq!(a.capacity(), 0, "an empty one goes back");
        let b = take();
        assert!(b.capacity() >= READ_CHUNK);
        // One that grew for a large message is not pooled.
        let mut big = BytesMut::with_capacity(4 * READ_CHUNK);
        give(&mut big);
        assert_eq!(big.capacity(), 0);
    }

    #[test]
    fn the_last_buffer_given_back_is_the_first_taken_and_none_is_lost() {
        // A thread of its own: the pool is per thread.
        std::thread::spawn(|| {
            let (mut a, mut b) = (take(), take());
            let (pa, pb) = (a.as_ptr(), b.as_ptr());
            give(&mut a);
            give(&mut b);
            // Held, so that the allocator cannot hand the same memory out again.
            let taken = [take(), take(), take()];
            assert_eq!(taken[0].as_ptr(), pb, "the last given back");
            assert_eq!(taken[1].as_ptr(), pa, "then the pool's");
            assert!(![pa, pb].contains(&taken[2].as_ptr()), "then a new one");
        })
        .join()
        .unwrap();
    }
}
