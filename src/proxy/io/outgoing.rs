//! What one read becomes on the other side: the frames read, some of them replaced by the
//! relay (a Bind naming the target's variant, a RowDescription with legacy's identities, an
//! answer the client never asked for swallowed), sent in **one write**.
//!
//! A write is a system call and, on a loopback or a LAN, a wake-up of the peer: writing the
//! bytes before a replaced frame, the replacement and the bytes after it apart made a query
//! served by the target cost three writes where legacy's costs one (measured with `strace
//! -c`: five `sendto` per `affiliate_by_id` execution at `target` against two at `legacy`,
//! ~20 µs of the relay's CPU per query; docs/performance.md). The bytes around a replacement
//! are copied once into a pending buffer instead, which is written with the rest of the read.
//! The buffer is lent by the read buffers' pool and given back after each write: a session at
//! rest holds none, and a busy one does not ask the allocator for one per replacement.

use bytes::{Buf, BytesMut};

use super::{WriteNow, buffers, write_all_now};

/// The part of a read already decided but not yet written: everything before the read
/// buffer's first byte still there.
#[derive(Default)]
pub struct Outgoing {
    pending: BytesMut,
}

impl Outgoing {
    /// Puts `frames` in place of the `total` bytes of `buf` that follow its first `ready`
    /// ones: those and `frames` become pending, and `buf` then starts after the replaced
    /// bytes.
    pub fn splice(&mut self, buf: &mut BytesMut, ready: usize, total: usize, frames: &[u8]) {
        if self.pending.is_empty() {
            // A pooled buffer (the read buffers' pool), sized once for what usually follows
            // (the rest of the read) too.
            self.pending = buffers::take();
            self.pending.reserve(buf.len() - total + frames.len());
        }
        self.pending.extend_from_slice(&buf[..ready]);
        self.pending.extend_from_slice(frames);
        buf.advance(ready + total);
    }

    /// Writes what is pending and then the first `ready` bytes of `buf`, in one write, and
    /// flushes (over TLS, records the socket could not take yet wait in the session until a
    /// flush); nothing when there is nothing. `buf` then starts after them. False if the peer
    /// is gone.
    pub async fn send<W: WriteNow>(
        &mut self,
        peer: &mut W,
        buf: &mut BytesMut,
        ready: usize,
    ) -> bool {
        let written = if self.pending.is_empty() {
            if ready == 0 {
                return true;
            }
            write_all_now(peer, &buf[..ready]).await.is_ok()
        } else {
            self.pending.extend_from_slice(&buf[..ready]);
            let mut pending = std::mem::take(&mut self.pending);
            let written = write_all_now(peer, &pending).await.is_ok();
            // Back to the pool, as a read buffer is when its session waits.
            pending.clear();
            buffers::give(&mut pending);
            written
        };
        if written {
            buf.advance(ready);
        }
        written
    }
}
