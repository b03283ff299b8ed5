//! Connections to the upstream PostgreSQL: one per client session (session mode), opened
//! with the client's own startup packet so that the server authenticates the client itself.

use std::io;

use tokio::net::{TcpStream, UnixStream, tcp, unix};
use tokio_util::either::Either;

use crate::{config::UpstreamAddr, session::relay::Duplex};

/// A socket to the upstream: TCP or a Unix socket.
pub type UpstreamStream = Either<TcpStream, UnixStream>;

pub async fn connect(addr: &UpstreamAddr) -> io::Result<UpstreamStream> {
    match addr {
        UpstreamAddr::Tcp { host, port } => {
            let stream = TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            Ok(Either::Left(stream))
        }
        UpstreamAddr::Unix(path) => Ok(Either::Right(UnixStream::connect(path).await?)),
    }
}

impl Duplex for UpstreamStream {
    type Read<'a> = Either<tcp::ReadHalf<'a>, unix::ReadHalf<'a>>;
    type Write<'a> = Either<tcp::WriteHalf<'a>, unix::WriteHalf<'a>>;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        match self {
            Either::Left(s) => {
                let (r, w) = s.split();
                (Either::Left(r), Either::Left(w))
            }
            Either::Right(s) => {
                let (r, w) = s.split();
                (Either::Right(r), Either::Right(w))
            }
        }
    }
}
