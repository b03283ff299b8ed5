//! PostgreSQL protocol v3 frames ↔ bytes. No I/O: everything here works on buffers, so it
//! can be unit-tested and fuzzed.
//!
//! The proxy relays frames; it decodes only what it must look at (see [`messages`]).
//! Everything else — including message types it does not know, such as FunctionCall — is
//! relayed as raw bytes, never refused. A length that cannot be right (under 4) or over the
//! configured limit is a protocol violation: the caller answers FATAL 08P01 and closes.

pub mod messages;

use bytes::{Buf, Bytes, BytesMut};

/// Request codes of the untyped initial packets.
pub const SSL_REQUEST: u32 = 80_877_103;
pub const GSSENC_REQUEST: u32 = 80_877_104;
pub const CANCEL_REQUEST: u32 = 80_877_102;

/// The largest startup packet we accept (PostgreSQL's own limit is 10000 bytes).
pub const MAX_STARTUP_PACKET: usize = 10_000;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WireError {
    #[error("invalid length {len} of message type {tag:?}")]
    BadLength { tag: char, len: u32 },

    #[error("message of type {tag:?} is {len} bytes, over the limit of {max}")]
    TooLarge { tag: char, len: usize, max: usize },

    #[error("invalid startup packet length {0}")]
    BadStartupLength(u32),

    #[error("malformed {0}")]
    Malformed(&'static str),
}

/// The first packet of a connection (it has no type byte).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Initial {
    SslRequest,
    GssEncRequest,
    /// Protocol 3.0 has a 4-byte secret; 3.2 allows up to 256 bytes.
    CancelRequest {
        pid: u32,
        secret: Bytes,
    },
    Startup(Startup),
}

/// A StartupMessage: the protocol version the client asked for and its parameters, plus
/// the packet's raw bytes, which are relayed to the upstream unchanged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Startup {
    pub major: u16,
    pub minor: u16,
    pub params: Vec<(String, String)>,
    pub raw: Bytes,
}

impl Startup {
    pub fn param(&self, name: &str) -> Option<&str> {
        self.params
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The user, and the database (which defaults to the user, as in PostgreSQL).
    pub fn user_and_database(&self) -> (&str, &str) {
        let user = self.param("user").unwrap_or("");
        (user, self.param("database").unwrap_or(user))
    }
}

/// Takes the initial packet off `buf` once it is complete.
pub fn take_initial(buf: &mut BytesMut) -> Result<Option<Initial>, WireError> {
    if buf.len() < 8 {
        return Ok(None);
    }
    let len = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if !(8..=MAX_STARTUP_PACKET as u32).contains(&len) {
        return Err(WireError::BadStartupLength(len));
    }
    if buf.len() < len as usize {
        return Ok(None);
    }
    let raw = buf.split_to(len as usize).freeze();
    let code = u32::from_be_bytes([raw[4], raw[5], raw[6], raw[7]]);
    Ok(Some(match code {
        SSL_REQUEST if len == 8 => Initial::SslRequest,
        GSSENC_REQUEST if len == 8 => Initial::GssEncRequest,
        CANCEL_REQUEST if len >= 16 => {
            let pid = u32::from_be_bytes([raw[8], raw[9], raw[10], raw[11]]);
            Initial::CancelRequest {
                pid,
                secret: raw.slice(12..),
            }
        }
        SSL_REQUEST | GSSENC_REQUEST | CANCEL_REQUEST => {
            return Err(WireError::BadStartupLength(len));
        }
        version => {
            let params = parse_params(&raw[8..])?;
            Initial::Startup(Startup {
                major: (version >> 16) as u16,
                minor: (version & 0xffff) as u16,
                params,
                raw,
            })
        }
    }))
}

fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, WireError> {
    let mut params = Vec::new();
    loop {
        let key = take_cstr(&mut body).ok_or(WireError::Malformed("startup parameters"))?;
        if key.is_empty() {
            return Ok(params);
        }
        let value = take_cstr(&mut body).ok_or(WireError::Malformed("startup parameters"))?;
        params.push((
            String::from_utf8_lossy(key).into_owned(),
            String::from_utf8_lossy(value).into_owned(),
        ));
    }
}

/// Splits a NUL-terminated string off the front of `body`.
#[inline]
pub fn take_cstr<'a>(body: &mut &'a [u8]) -> Option<&'a [u8]> {
    let end = nul(body)?;
    let s = &body[..end];
    *body = &body[end + 1..];
    Some(s)
}

/// Where the first NUL of `body` is. The strings of a Bind or an Execute (portal and
/// statement names, most often empty) and a RowDescription's column names are short:
/// their first 16 bytes are looked at a word at a time first, since `memchr`'s vector
/// set-up costs more than such a string (~55 instructions a call, four calls per
/// execution); longer ones (a Parse's SQL) go on to `memchr`.
#[inline]
pub fn nul(body: &[u8]) -> Option<usize> {
    const SHORT: usize = 16;
    const ONES: u64 = u64::from_ne_bytes([0x01; 8]);
    const HIGHS: u64 = u64::from_ne_bytes([0x80; 8]);
    // The empty name (an unnamed portal or statement), the commonest string of all.
    if body.first() == Some(&0) {
        return Some(0);
    }
    let short = body.len().min(SHORT);
    let mut at = 0;
    while let Some(word) = body[at..short].first_chunk::<8>() {
        // A byte's high bit is set here where the word has a zero byte, and the lowest one
        // set is the first zero byte (the borrow only carries towards later bytes).
        let word = u64::from_le_bytes(*word);
        let zeros = word.wrapping_sub(ONES) & !word & HIGHS;
        if zeros != 0 {
            return Some(at + (zeros.trailing_zeros() / 8) as usize);
        }
        at += 8;
    }
    for (i, &b) in body[at..short].iter().enumerate() {
        if b == 0 {
            return Some(at + i);
        }
    }
    if body.len() <= SHORT {
        return None;
    }
    memchr::memchr(0, &body[SHORT..]).map(|at| at + SHORT)
}

/// The header of a typed frame: its type byte and total size (type byte included).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub tag: u8,
    pub total: usize,
}

/// Reads the header at the start of `buf`, if its five bytes are there.
pub fn header(buf: &[u8], max: usize) -> Result<Option<Header>, WireError> {
    if buf.len() < 5 {
        return Ok(None);
    }
    let tag = buf[0];
    let len = u32::from_be_bytes([buf[1], buf[2], buf[3], buf[4]]);
    if len < 4 {
        return Err(WireError::BadLength {
            tag: tag as char,
            len,
        });
    }
    let total = len as usize + 1;
    if total > max {
        return Err(WireError::TooLarge {
            tag: tag as char,
            len: total,
            max,
        });
    }
    Ok(Some(Header { tag, total }))
}

/// Takes one whole frame off `buf`, if it is complete.
pub fn take_frame(buf: &mut BytesMut, max: usize) -> Result<Option<(u8, Bytes)>, WireError> {
    match header(buf, max)? {
        Some(h) if buf.len() >= h.total => {
            let mut frame = buf.split_to(h.total).freeze();
            frame.advance(5);
            Ok(Some((h.tag, frame)))
        }
        _ => Ok(None),
    }
}

/// Builds a typed frame from its type byte and body.
pub fn frame(tag: u8, body: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(body.len() + 5);
    out.extend_from_slice(&[tag]);
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    out.freeze()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn startup_bytes(version: u32, params: &[(&str, &str)]) -> BytesMut {
        let mut body = Vec::new();
        body.extend_from_slice(&version.to_be_bytes());
        for (k, v) in params {
            body.extend_from_slice(k.as_bytes());
            body.push(0);
            body.extend_from_slice(v.as_bytes());
            body.push(0);
        }
        body.push(0);
        let mut out = BytesMut::new();
        out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
        out.extend_from_slice(&body);
        out
    }

    proptest::proptest! {
        /// The short scan and its `memchr` fallback find the NUL `memchr` finds, on either
        /// side of the 16 bytes and with none at all.
        #[test]
        fn nul_is_where_memchr_finds_it(
            body in proptest::collection::vec(
                proptest::prop_oneof![20 => 1u8..=255, 1 => proptest::strategy::Just(0u8)],
                0..40,
            )
        ) {
            proptest::prop_assert_eq!(nul(&body), memchr::memchr(0, &body));
        }
    }

    #[test]
    fn startup_is_parsed_and_kept_raw() {
        let mut buf = startup_bytes(196_608, &[("user", "app"), ("database", "fature")]);
        let raw = buf.clone().freeze();
        let Some(Initial::Startup(s)) = take_initial(&mut buf).unwrap() else {
            panic!("a startup message")
        };
        assert_eq!((s.major, s.minor), (3, 0));
        assert_eq!(s.user_and_database(), ("app", "fature"));
        assert_eq!(s.raw, raw);
        assert!(buf.is_empty());
    }

    #[test]
    fn newer_minor_versions_and_database_default() {
        let mut buf = startup_bytes((3 << 16) | 2, &[("user", "app")]);
        let Some(Initial::Startup(s)) = take_initial(&mut buf).unwrap() else {
            panic!()
        };
        assert_eq!((s.major, s.minor), (3, 2));
        assert_eq!(s.user_and_database(), ("app", "app"));
    }

    #[test]
    fn partial_packets_wait() {
        let full = startup_bytes(196_608, &[("user", "app")]);
        for cut in 0..full.len() {
            let mut part = BytesMut::from(&full[..cut]);
            assert_eq!(take_initial(&mut part).unwrap(), None, "cut at {cut}");
        }
    }

    #[test]
    fn requests_and_cancel() {
        let mut ssl = BytesMut::from(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f][..]);
        assert_eq!(take_initial(&mut ssl).unwrap(), Some(Initial::SslRequest));
        let mut cancel = BytesMut::new();
        cancel.extend_from_slice(&16u32.to_be_bytes());
        cancel.extend_from_slice(&CANCEL_REQUEST.to_be_bytes());
        cancel.extend_from_slice(&42u32.to_be_bytes());
        cancel.extend_from_slice(&[1, 2, 3, 4]);
        assert_eq!(
            take_initial(&mut cancel).unwrap(),
            Some(Initial::CancelRequest {
                pid: 42,
                secret: Bytes::from_static(&[1, 2, 3, 4])
            })
        );
    }

    #[test]
    fn bad_lengths_are_violations() {
        let mut tiny = BytesMut::from(&[0, 0, 0, 3, 0, 0, 0, 0][..]);
        assert!(take_initial(&mut tiny).is_err());
        let mut huge = BytesMut::from(&[0, 1, 0, 0, 0, 3, 0, 0][..]);
        assert!(take_initial(&mut huge).is_err());
        let mut unterminated = BytesMut::new();
        unterminated.extend_from_slice(&13u32.to_be_bytes());
        unterminated.extend_from_slice(&196_608u32.to_be_bytes());
        unterminated.extend_from_slice(b"user\0");
        assert_eq!(
            take_initial(&mut unterminated),
            Err(WireError::Malformed("startup parameters"))
        );

        assert!(matches!(
            header(&[b'Q', 0, 0, 0, 3], 100),
            Err(WireError::BadLength { .. })
        ));
        assert!(matches!(
            header(&[b'Q', 0, 0, 1, 0], 100),
            Err(WireError::TooLarge { .. })
        ));
    }

    #[test]
    fn frames_round_trip() {
        let f = frame(b'Q', b"SELECT 1\0");
        let mut buf = BytesMut::from(&f[..]);
        buf.extend_from_slice(&f[..3]);
        let (tag, body) = take_frame(&mut buf, 1 << 20).unwrap().unwrap();
        assert_eq!((tag, &body[..]), (b'Q', &b"SELECT 1\0"[..]));
        assert_eq!(take_frame(&mut buf, 1 << 20).unwrap(), None);
    }
}
