//! The sockets a session relays between: [`Duplex`], a socket read and written at once from
//! one task, the read buffers lent per read ([`buffers`]), and what a read becomes on the
//! other side, sent in one write ([`outgoing`]).

pub mod buffers;
pub mod outgoing;

use buffers::ReadReady;
use tokio::io::{AsyncRead, AsyncWrite};

/// A socket that can be read and written at the same time from one task.
pub trait Duplex: AsyncRead + AsyncWrite + Unpin {
    type Read<'a>: ReadReady + Send + Sync
    where
        Self: 'a;
    type Write<'a>: AsyncWrite + Unpin + Send + Sync
    where
        Self: 'a;

    /// Borrowed halves; for plain sockets these are free (no lock, unlike
    /// `tokio::io::split`), which matters on a path crossed twice per query.
    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>);
}
