//! What one read becomes on the other side: the frames read, some of them replaced by the
//! relay (a Bind naming the target's variant, a RowDescription with legacy's identities, an
//! answer the client never asked for swallowed), sent in **one write**.
//!
//! A write is a system call and, on a loopback or a LAN, a wake-up of the peer: writing the
//! bytes before a replaced frame, the replacement and the bytes after it apart made a query
//! served by the target cost three writes where legacy's costs one (measured with `strace
//! -c`: five `sendto` per `affiliate_by_id` execution at `target` against two at `legacy`,
//! ~20 µs of the relay's CPU per query; docs/performance.md). Instead, a replacement with few
//! bytes after it is made in the read buffer itself (those bytes moved); otherwise the bytes
//! before it and the replacement are copied once into a pending buffer, which is written with
//! the rest of the read, so that a pipelined batch is not moved once per replaced frame. That
//! buffer is lent by the read buffers' pool and given back after each write: a session at rest
//! holds none, and a busy one does not ask the allocator for one per replacement.

use bytes::{Buf, BytesMut};

use super::{WriteNow, buffers, write_all_now};

/// The most bytes after a replaced frame that [`Outgoing::splice`] moves to make the
/// replacement in the read buffer itself (~100 instructions less than the pending buffer's
/// round trip through the pool, for a Bind routed to the target).
const IN_PLACE_TAIL: usize = 256;

/// The part of a read already decided but not yet written: everything before the read
/// buffer's first byte still there.
#[derive(Default)]
pub struct Outgoing {
    pending: BytesMut,
}

impl Outgoing {
    /// Puts `frames` in place of the `total` bytes of `buf` that follow its first `ready`
    /// ones, and returns how many of `buf`'s first bytes are now decided (the caller's next
    /// `ready`). When few bytes follow the replaced ones (up to `IN_PLACE_TAIL`, a
    /// driver's Describe, Execute and Sync after its Bind), the replacement is made in
    /// `buf` itself, those bytes moved by the difference in size. Otherwise the first `ready`
    /// bytes and `frames` become pending, `buf` then starts after the replaced bytes, and
    /// nothing of it is decided (0): a pipelined batch of many replaced frames is not moved
    /// once per frame.
    pub fn splice(
        &mut self,
        buf: &mut BytesMut,
        ready: usize,
        total: usize,
        frames: &[u8],
    ) -> usize {
        let end = ready + total;
        let tail = buf.len() - end;
        if tail <= IN_PLACE_TAIL {
            let placed = ready + frames.len();
            if frames.len() > total {
                buf.resize(placed + tail, 0);
            }
            buf.copy_within(end..end + tail, placed);
            buf[ready..placed].copy_from_slice(frames);
            buf.truncate(placed + tail);
            return placed;
        }
        if self.pending.is_empty() {
            // A pooled buffer (the read buffers' pool), sized once for what usually follows
            // (the rest of the read) too.
            self.pending = buffers::take();
            self.pending.reserve(tail + frames.len());
        }
        self.pending.extend_from_slice(&buf[..ready]);
        self.pending.extend_from_slice(frames);
        buf.advance(end);
        0
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

#[cfg(test)]
mod tests {
    use proptest::prelude::*;
    use tokio::io::AsyncReadExt;

    use super::*;

    /// One frame of a read: its bytes, and what the relay puts in its place, if anything.
    type Frame = (Vec<u8>, Option<Vec<u8>>);

    fn frame() -> impl Strategy<Value = Frame> {
        let bytes = |max| proptest::collection::vec(any::<u8>(), 0..max);
        // Replacements short and long; tails long enough to take the pending buffer.
        (bytes(400), proptest::option::of(bytes(300)))
    }

    /// What the relay writes for a read of `frames`, through `splice` and `send` as the
    /// relay calls them (and a send in the middle, as a names question makes).
    fn written(frames: &[Frame], send_after: usize) -> Vec<u8> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("a current-thread runtime");
        runtime.block_on(async {
            let (near, mut far) = tokio::io::duplex(1 << 20);
            let (_, mut peer) = tokio::io::split(near);
            let mut buf = BytesMut::new();
            for (bytes, _) in frames {
                buf.extend_from_slice(bytes);
            }
            let mut out = Outgoing::default();
            let mut ready = 0;
            for (n, (bytes, replacement)) in frames.iter().enumerate() {
                match replacement {
                    Some(frames) => ready = out.splice(&mut buf, ready, bytes.len(), frames),
                    None => ready += bytes.len(),
                }
                if n == send_after {
                    assert!(out.send(&mut peer, &mut buf, ready).await);
                    ready = 0;
                }
            }
            assert!(out.send(&mut peer, &mut buf, ready).await);
            assert!(buf.is_empty(), "every byte read was decided");
            drop(peer);
            let mut all = Vec::new();
            far.read_to_end(&mut all).await.expect("the duplex's bytes");
            all
        })
    }

    proptest! {
        /// Every frame is written once, in order, as itself or as its replacement: whether
        /// the replacement was made in place or through the pending buffer.
        #[test]
        fn a_read_is_written_with_its_replacements_in_place(
            frames in proptest::collection::vec(frame(), 1..8),
            send_after in 0usize..10,
        ) {
            let expected: Vec<u8> = frames
                .iter()
                .flat_map(|(bytes, replacement)| replacement.as_ref().unwrap_or(bytes).clone())
                .collect();
            prop_assert_eq!(written(&frames, send_after), expected);
        }
    }
}
