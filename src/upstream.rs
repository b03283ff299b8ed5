//! Connections to the upstream PostgreSQL: one per client session (session mode), opened
//! with the client's own startup packet so that the server authenticates the client itself.

use std::{
    io,
    pin::Pin,
    task::{Context, Poll},
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpStream, UnixStream, tcp, unix},
};

use crate::{config::UpstreamAddr, session::relay::Duplex};

/// A socket to the upstream.
#[derive(Debug)]
pub enum UpstreamStream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

pub async fn connect(addr: &UpstreamAddr) -> io::Result<UpstreamStream> {
    match addr {
        UpstreamAddr::Tcp { host, port } => {
            let stream = TcpStream::connect((host.as_str(), *port)).await?;
            stream.set_nodelay(true)?;
            Ok(UpstreamStream::Tcp(stream))
        }
        UpstreamAddr::Unix(path) => Ok(UpstreamStream::Unix(UnixStream::connect(path).await?)),
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Unix(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Unix(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Unix(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Unix(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

/// A borrowed read or write half of a socket that is one of two kinds (TCP or Unix
/// upstream; plain or TLS client).
pub enum Half<L, R> {
    Left(L),
    Right(R),
}

impl Duplex for UpstreamStream {
    type Read<'a> = Half<tcp::ReadHalf<'a>, unix::ReadHalf<'a>>;
    type Write<'a> = Half<tcp::WriteHalf<'a>, unix::WriteHalf<'a>>;

    fn halves(&mut self) -> (Self::Read<'_>, Self::Write<'_>) {
        match self {
            UpstreamStream::Tcp(s) => {
                let (r, w) = s.split();
                (Half::Left(r), Half::Left(w))
            }
            UpstreamStream::Unix(s) => {
                let (r, w) = s.split();
                (Half::Right(r), Half::Right(w))
            }
        }
    }
}

impl<T: AsyncRead + Unpin, U: AsyncRead + Unpin> AsyncRead for Half<T, U> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Half::Left(s) => Pin::new(s).poll_read(cx, buf),
            Half::Right(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl<T: AsyncWrite + Unpin, U: AsyncWrite + Unpin> AsyncWrite for Half<T, U> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Half::Left(s) => Pin::new(s).poll_write(cx, buf),
            Half::Right(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Half::Left(s) => Pin::new(s).poll_flush(cx),
            Half::Right(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Half::Left(s) => Pin::new(s).poll_shutdown(cx),
            Half::Right(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}
