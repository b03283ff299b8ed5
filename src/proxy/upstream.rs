//! Connections to the upstream PostgreSQL: one per client session (session mode), opened
//! with the client's own startup packet so that the server authenticates the client itself,
//! over TLS when the upstream URL's `sslmode` asks for it (TCP only, as libpq).

use std::io;

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpStream, UnixStream, tcp, unix},
};
use tokio_rustls::{TlsConnector, client::TlsStream, rustls::pki_types::ServerName};
use tokio_util::either::Either;

use crate::{
    config::UpstreamAddr,
    proxy::io::{Duplex, event_loop::Plain},
    wire,
};

/// A plain socket to the upstream: TCP or a Unix socket.
pub type PlainStream = Either<TcpStream, UnixStream>;

/// A socket to the upstream: plain, or TLS over TCP.
pub type UpstreamStream = Either<PlainStream, Box<TlsStream<TcpStream>>>;

/// Whether to encrypt the connection to the upstream (the URL's `sslmode`).
#[derive(Clone)]
pub enum UpstreamTls {
    Disable,
    /// Encrypt if the server can; otherwise plain.
    Prefer(TlsConnector),
    /// Encrypt, or fail.
    Require(TlsConnector),
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            UpstreamTls::Disable => "disable",
            UpstreamTls::Prefer(_) => "prefer",
            UpstreamTls::Require(_) => "require",
        })
    }
}

/// A plain connection (cancel requests, reachability).
pub async fn connect(addr: &UpstreamAddr) -> io::Result<PlainStream> {
    match addr {
        UpstreamAddr::Tcp { host, port } => {
            let stream = TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            Ok(Either::Left(stream))
        }
        UpstreamAddr::Unix(path) => Ok(Either::Right(UnixStream::connect(path).await?)),
    }
}

/// A session's connection: negotiates TLS first when `tls` says so.
pub async fn connect_session(addr: &UpstreamAddr, tls: &UpstreamTls) -> io::Result<UpstreamStream> {
    let (connector, required) = match tls {
        UpstreamTls::Disable => return Ok(Either::Left(connect(addr).await?)),
        UpstreamTls::Prefer(c) => (c, false),
        UpstreamTls::Require(c) => (c, true),
    };
    let (host, mut tcp) = match (addr, connect(addr).await?) {
        (UpstreamAddr::Tcp { host, .. }, Either::Left(tcp)) => (host.clone(), tcp),
        // No TLS over Unix sockets (libpq does not either).
        (_, plain) => return Ok(Either::Left(plain)),
    };
    let mut request = Vec::with_capacity(8);
    request.extend_from_slice(&8u32.to_be_bytes());
    request.extend_from_slice(&wire::SSL_REQUEST.to_be_bytes());
    tcp.write_all(&request).await?;
    let answer = tcp.read_u8().await?;
    if answer != b'S' {
        if required {
            return Err(io::Error::other(
                "the upstream server does not accept TLS, and the upstream URL says sslmode=require",
            ));
        }
        // 'N': go on in plain text on the same connection (an 'E' from a very old server
        // means it closed; the next read says so).
        return Ok(Either::Left(Either::Left(tcp)));
    }
    let name =
        ServerName::try_from(host).map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    let tls = connector.connect(name, tcp).await?;
    Ok(Either::Right(Box::new(tls)))
}

type TlsRead<'a> = tokio::io::ReadHalf<&'a mut TlsStream<TcpStream>>;
type TlsWrite<'a> = tokio::io::WriteHalf<&'a mut TlsStream<TcpStream>>;

impl Duplex for UpstreamStream {
    type Read<'a> = Either<Either<tcp::ReadHalf<'a>, unix::ReadHalf<'a>>, TlsRead<'a>>;
    type Write<'a> = Either<Either<tcp::WriteHalf<'a>, unix::WriteHalf<'a>>, TlsWrite<'a>>;

    fn is_plain(&self) -> bool {
        matches!(self, Either::Left(_))
    }

    fn into_plain(self) -> Result<io::Result<Plain>, Self> {
        match self {
            Either::Left(Either::Left(tcp)) => Ok(tcp.into_std().map(Plain::Tcp)),
            Either::Left(Either::Right(unix)) => Ok(unix.into_std().map(Plain::Unix)),
            tls => Err(tls),
        }
    }

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        match self {
            Either::Left(Either::Left(s)) => {
                let (r, w) = s.split();
                (Either::Left(Either::Left(r)), Either::Left(Either::Left(w)))
            }
            Either::Left(Either::Right(s)) => {
                let (r, w) = s.split();
                (
                    Either::Left(Either::Right(r)),
                    Either::Left(Either::Right(w)),
                )
            }
            Either::Right(s) => {
                // TLS state is shared by both directions: these halves take a lock.
                let (r, w) = tokio::io::split(s.as_mut());
                (Either::Right(r), Either::Right(w))
            }
        }
    }
}
