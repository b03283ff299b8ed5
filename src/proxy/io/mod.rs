//! The sockets a session relays between: [`Duplex`], a socket read and written at once from
//! one task, the read buffers lent per read ([`buffers`]), and what a read becomes on the
//! other side, sent in one write ([`outgoing`]), the race of the relay's two directions
//! ([`race`]), and the session threads' own event loop that relays plain sockets
//! ([`event_loop`], [`loop_stream`]).

pub mod buffers;
pub mod event_loop;
pub mod loop_stream;
pub mod outgoing;
pub mod race;

use std::io;

use buffers::ReadReady;
use tokio::{
    io::{AsyncRead, AsyncWrite, AsyncWriteExt},
    net::{tcp, unix},
};
use tokio_util::either::Either;

/// A socket that can be read and written at the same time from one task.
pub trait Duplex: AsyncRead + AsyncWrite + Unpin {
    type Read<'a>: ReadReady
    where
        Self: 'a;
    type Write<'a>: WriteNow
    where
        Self: 'a;

    /// Borrowed halves; for plain sockets these are free (no lock, unlike
    /// `tokio::io::split`), which matters on a path crossed twice per query.
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);

    /// Whether [`Self::into_plain`] takes it out of tokio.
    fn is_plain(&self) -> bool {
        false
    }

    /// The socket out of tokio, for a session thread's [`event_loop`], when it is a plain
    /// one (TCP or Unix); itself back otherwise (TLS stays on tokio). An error loses the
    /// socket (tokio could not let it go).
    fn into_plain(self) -> Result<io::Result<event_loop::Plain>, Self>
    where
        Self: Sized,
    {
        Err(self)
    }
}

/// A write half that can write without a future when the socket has room, which it nearly
/// always has: a frame or two per write.
pub trait WriteNow: AsyncWrite + Unpin {
    /// Writes what the socket takes now, without a future (`WouldBlock` when it takes
    /// nothing); `None` for a stream that can only be written through one (TLS).
    fn try_write_now(&self, bytes: &[u8]) -> Option<io::Result<usize>>;

    /// Whether written bytes may wait in the stream until a flush (TLS records); a plain
    /// socket hands them to the kernel at once.
    fn buffers(&self) -> bool;
}

/// The write halves of plain sockets (TCP, Unix): written without a future, nothing held
/// back until a flush.
macro_rules! plain_write_half {
    ($half:ty) => {
        impl WriteNow for $half {
            fn try_write_now(&self, bytes: &[u8]) -> Option<io::Result<usize>> {
                Some(self.try_write(bytes))
            }

            fn buffers(&self) -> bool {
                false
            }
        }
    };
}

plain_write_half!(tcp::WriteHalf<'_>);
plain_write_half!(unix::WriteHalf<'_>);

impl<T: AsyncWrite> WriteNow for tokio::io::WriteHalf<T> {
    fn try_write_now(&self, _: &[u8]) -> Option<io::Result<usize>> {
        None
    }

    fn buffers(&self) -> bool {
        true
    }
}

impl<L: WriteNow, R: WriteNow> WriteNow for Either<L, R> {
    fn try_write_now(&self, bytes: &[u8]) -> Option<io::Result<usize>> {
        match self {
            Either::Left(l) => l.try_write_now(bytes),
            Either::Right(r) => r.try_write_now(bytes),
        }
    }

    fn buffers(&self) -> bool {
        match self {
            Either::Left(l) => l.buffers(),
            Either::Right(r) => r.buffers(),
        }
    }
}

/// Writes all of `bytes` and flushes what the stream may hold back: at once when the socket
/// takes them (one system call, no future), through the write future for what it does not.
pub async fn write_all_now<W: WriteNow>(peer: &mut W, bytes: &[u8]) -> io::Result<()> {
    let written = match peer.try_write_now(bytes) {
        Some(Ok(n)) => n,
        Some(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => 0,
        Some(Err(e)) => return Err(e),
        None => 0,
    };
    if written < bytes.len() {
        peer.write_all(&bytes[written..]).await?;
    }
    if peer.buffers() {
        peer.flush().await?;
    }
    Ok(())
}
