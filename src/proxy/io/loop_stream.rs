//! A plain socket (TCP or Unix) registered on a session thread's [`event_loop`]: read and
//! written with one system call each, readiness kept in two flags its events set, and a
//! waker per direction. It lives and dies on its loop's thread.
//!
//! [`event_loop`]: super::event_loop

#[cfg(not(target_os = "linux"))]
use std::io::{Read, Write};
use std::{
    io,
    net::Shutdown,
    os::fd::{AsRawFd, RawFd},
    pin::Pin,
    rc::Rc,
    task::{Context, Poll},
};

use bytes::{BufMut, BytesMut};
use mio::{Token, event::Source};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use super::{
    Duplex, WriteNow,
    buffers::ReadReady,
    event_loop::{BOTH, Readiness, with_sockets},
};

/// A plain socket taken out of tokio after the login, on its way to a loop.
pub enum Plain {
    Tcp(std::net::TcpStream),
    Unix(std::os::unix::net::UnixStream),
}

enum Socket {
    Tcp(mio::net::TcpStream),
    Unix(mio::net::UnixStream),
}

impl Socket {
    fn source(&mut self) -> &mut dyn Source {
        match self {
            Socket::Tcp(s) => s,
            Socket::Unix(s) => s,
        }
    }

    fn fd(&self) -> RawFd {
        match self {
            Socket::Tcp(s) => s.as_raw_fd(),
            Socket::Unix(s) => s.as_raw_fd(),
        }
    }

    /// `recv`, as std's `read` of a socket, made as a bare system call: glibc's wrappers
    /// are cancellation points, which in a process with threads cost two more calls around
    /// each (~130 instructions a transaction; a single-threaded pgbouncer skips them).
    #[cfg(target_os = "linux")]
    fn read(&self, into: &mut [u8]) -> io::Result<usize> {
        // SAFETY: `into` is valid for writes of its length; the fd is this socket's, open
        // for as long as `self`.
        let n = unsafe {
            libc::syscall(
                libc::SYS_recvfrom,
                self.fd(),
                into.as_mut_ptr(),
                into.len(),
                0,
                std::ptr::null_mut::<libc::sockaddr>(),
                std::ptr::null_mut::<libc::socklen_t>(),
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    /// `send` with `MSG_NOSIGNAL`, as std's `write` of a socket (see [`Self::read`]).
    #[cfg(target_os = "linux")]
    fn write(&self, bytes: &[u8]) -> io::Result<usize> {
        // SAFETY: `bytes` is valid for reads of its length; the fd is this socket's.
        let n = unsafe {
            libc::syscall(
                libc::SYS_sendto,
                self.fd(),
                bytes.as_ptr(),
                bytes.len(),
                libc::MSG_NOSIGNAL,
                std::ptr::null::<libc::sockaddr>(),
                0 as libc::socklen_t,
            )
        };
        usize::try_from(n).map_err(|_| io::Error::last_os_error())
    }

    #[cfg(not(target_os = "linux"))]
    fn read(&self, into: &mut [u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => (&*s).read(into),
            Socket::Unix(s) => (&*s).read(into),
        }
    }

    #[cfg(not(target_os = "linux"))]
    fn write(&self, bytes: &[u8]) -> io::Result<usize> {
        match self {
            Socket::Tcp(s) => (&*s).write(bytes),
            Socket::Unix(s) => (&*s).write(bytes),
        }
    }

    fn shutdown(&self) -> io::Result<()> {
        match self {
            Socket::Tcp(s) => s.shutdown(Shutdown::Write),
            Socket::Unix(s) => s.shutdown(Shutdown::Write),
        }
    }
}

/// A socket registered on this thread's loop.
pub struct Stream {
    socket: Socket,
    io: Rc<Readiness>,
    token: usize,
}

impl Stream {
    /// Registers `plain` (non-blocking, as tokio left it) on this thread's loop.
    pub(super) fn register(plain: Plain) -> io::Result<Self> {
        let mut socket = match plain {
            Plain::Tcp(s) => {
                s.set_nonblocking(true)?;
                Socket::Tcp(mio::net::TcpStream::from_std(s))
            }
            Plain::Unix(s) => {
                s.set_nonblocking(true)?;
                Socket::Unix(mio::net::UnixStream::from_std(s))
            }
        };
        let io = Rc::new(Readiness::default());
        let token = with_sockets(|sockets| {
            let entry = sockets.readiness.vacant_entry();
            let token = entry.key();
            sockets
                .registry
                .register(socket.source(), Token(token), BOTH)?;
            entry.insert(Rc::clone(&io));
            Ok::<_, io::Error>(token)
        })
        .ok_or_else(|| io::Error::other("not on a session thread"))??;
        Ok(Self { socket, io, token })
    }

    /// Reads what the socket holds into `buf`'s spare room; a read that did not fill it
    /// emptied the socket, and the readiness is cleared (the next wait parks until the
    /// socket says more came, instead of a read that fails with `EAGAIN`).
    fn read_buf(&self, buf: &mut BytesMut) -> io::Result<usize> {
        let spare = buf.spare_capacity_mut();
        let room = spare.len();
        // SAFETY: the socket only writes into the slice (initialised or not, its bytes are
        // never read before `advance_mut` below says which are), as `tokio`'s `try_read_buf`.
        let into = unsafe { &mut *(std::ptr::from_mut(spare) as *mut [u8]) };
        match self.socket.read(into) {
            Ok(n) => {
                // SAFETY: the socket filled `n` bytes of the spare room.
                unsafe { buf.advance_mut(n) };
                if 0 < n && n < room {
                    self.io.readable.set(false);
                }
                Ok(n)
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                self.io.readable.set(false);
                Err(e)
            }
            Err(e) => Err(e),
        }
    }

    fn poll_readable(&self, cx: &Context<'_>) -> Poll<()> {
        if self.io.readable.get() || self.io.read_closed.get() {
            Poll::Ready(())
        } else {
            Readiness::wait(&self.io.reader, cx.waker());
            Poll::Pending
        }
    }

    fn poll_read(&self, cx: &Context<'_>, out: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        loop {
            if self.poll_readable(cx).is_pending() {
                return Poll::Pending;
            }
            match self.socket.read(out.initialize_unfilled()) {
                Ok(n) => {
                    out.advance(n);
                    return Poll::Ready(Ok(()));
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => self.io.readable.set(false),
                Err(e) => return Poll::Ready(Err(e)),
            }
        }
    }

    fn poll_write(&self, cx: &Context<'_>, bytes: &[u8]) -> Poll<io::Result<usize>> {
        // Tried first: a socket nearly always has room. Only when it has none does the task
        // wait for the next writable event.
        match self.socket.write(bytes) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                Readiness::wait(&self.io.writer, cx.waker());
                Poll::Pending
            }
            other => Poll::Ready(other),
        }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        // Off its loop (the loop thread ending), the registration goes with the epoll.
        let _ = with_sockets(|sockets| {
            let _ = sockets.registry.deregister(self.socket.source());
            sockets.readiness.try_remove(self.token);
        });
    }
}

/// A [`Stream`]'s reading side.
pub struct ReadHalf<'a>(&'a Stream);
/// A [`Stream`]'s writing side.
pub struct WriteHalf<'a>(&'a Stream);

impl Duplex for Stream {
    type Read<'a> = ReadHalf<'a>;
    type Write<'a> = WriteHalf<'a>;

    fn halves(&mut self) -> (ReadHalf<'_>, WriteHalf<'_>) {
        (ReadHalf(self), WriteHalf(self))
    }
}

impl ReadReady for ReadHalf<'_> {
    fn tells_readiness(&self) -> bool {
        true
    }

    fn poll_readable(&self, cx: &mut Context<'_>) -> Poll<()> {
        self.0.poll_readable(cx)
    }

    fn try_read_now(&self, buf: &mut BytesMut) -> Option<io::Result<usize>> {
        Some(self.0.read_buf(buf))
    }
}

impl WriteNow for WriteHalf<'_> {
    fn try_write_now(&self, bytes: &[u8]) -> Option<io::Result<usize>> {
        Some(self.0.socket.write(bytes))
    }

    fn buffers(&self) -> bool {
        false
    }
}

impl AsyncRead for ReadHalf<'_> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.0.poll_read(cx, out)
    }
}

impl AsyncWrite for WriteHalf<'_> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.0.poll_write(cx, bytes)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.0.socket.shutdown())
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Stream::poll_read(&self, cx, out)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bytes: &[u8],
    ) -> Poll<io::Result<usize>> {
        Stream::poll_write(&self, cx, bytes)
    }

    fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(self.socket.shutdown())
    }
}
