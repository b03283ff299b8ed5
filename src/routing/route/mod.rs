//! Routing decisions: which side serves one execution of a query type, from its stage and a
//! sticky bucket — pure functions, applied by the relay per Query and per Bind — and the
//! [`check`]s that a statement may be served by the target at all.
//!
//! Buckets are deterministic and the same on every replica and every Rust version: the
//! first two bytes of SHA-256 of the bucketing key's canonical text, modulo 100. The key is
//! the session (by default) or a value the rule names (e.g. `affiliate_id`), so one
//! affiliate's queries never flip back and forth; and since the bucket does not depend on
//! the query type, raising several query types to N% moves the same N% of affiliates.
//! Raising N only adds buckets: a key served by the target at 25% still is at 50%.

pub mod check;
pub mod identity;

use sha2::{Digest, Sha256};

use crate::routing::rules::Stage;

/// The side that serves an execution.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Legacy,
    Target,
}

/// A key's bucket, 0 to 99.
pub fn bucket(key: &[u8]) -> u8 {
    let digest = Sha256::digest(key);
    (u16::from_be_bytes([digest[0], digest[1]]) % 100) as u8
}

/// Which side serves an execution whose bucketing key is `key`. The key's bucket (a
/// SHA-256) is computed only where it decides: at `cutover N%`.
pub fn decide(stage: Stage, key: &[u8]) -> Side {
    match stage {
        Stage::Legacy | Stage::Shadow => Side::Legacy,
        Stage::Cutover(p) if bucket(key) < p.get() => Side::Target,
        Stage::Cutover(_) => Side::Legacy,
        Stage::Target | Stage::Complete => Side::Target,
    }
}

/// A bound parameter's value as canonical text, so that a key sent as text by one client
/// and in binary by another falls in the same bucket: binary 2-, 4- and 8-byte values are
/// read as the integers they are (the keys rules name are integer ids); anything else is
/// taken as it is.
pub fn key_text(binary: bool, raw: &[u8]) -> KeyText<'_> {
    if !binary {
        return KeyText::Sent(raw);
    }
    let n = match *raw {
        [a, b] => i64::from(i16::from_be_bytes([a, b])),
        [a, b, c, d] => i64::from(i32::from_be_bytes([a, b, c, d])),
        [a, b, c, d, e, f, g, h] => i64::from_be_bytes([a, b, c, d, e, f, g, h]),
        _ => return KeyText::Sent(raw),
    };
    let mut text = [0; 20];
    let mut digits = itoa::Buffer::new();
    let digits = digits.format(n).as_bytes();
    text[..digits.len()].copy_from_slice(digits);
    KeyText::Integer(text, digits.len() as u8)
}

/// A bucketing key's canonical text ([`key_text`]): the bytes as sent, or an integer sent in
/// binary written out in decimal, on the stack (a `String` per execution was ~100
/// instructions of the allocator's at `cutover N%`).
#[derive(Debug, Clone, Copy)]
pub enum KeyText<'a> {
    Sent(&'a [u8]),
    /// The decimal digits (and sign) of an `i64`, at most 20, and how many.
    Integer([u8; 20], u8),
}

impl std::ops::Deref for KeyText<'_> {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        match self {
            KeyText::Sent(bytes) => bytes,
            KeyText::Integer(text, len) => &text[..usize::from(*len)],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::routing::rules::Percent;

    fn cutover(p: i64) -> Stage {
        Stage::Cutover(Percent::new(p).unwrap())
    }

    #[test]
    fn ten_thousand_keys_at_25_percent_give_25_percent_and_never_flip() {
        let keys: Vec<String> = (1..=10_000).map(|k| k.to_string()).collect();
        let on_target = |p| {
            keys.iter()
                .filter(|k| decide(cutover(p), k.as_bytes()) == Side::Target)
                .count()
        };
        let at_25 = on_target(25);
        assert!((2300..=2700).contains(&at_25), "{at_25} of 10000 at 25%");
        // The same key always on the same side, and raising only adds keys.
        for k in &keys {
            assert_eq!(bucket(k.as_bytes()), bucket(k.as_bytes()));
            if decide(cutover(25), k.as_bytes()) == Side::Target {
                assert_eq!(decide(cutover(50), k.as_bytes()), Side::Target);
            }
        }
        assert_eq!(on_target(0), 0);
        assert_eq!(on_target(100), 10_000);
    }

    #[test]
    fn stages_decide_the_side() {
        let keys: Vec<String> = (1..=200).map(|k| k.to_string()).collect();
        for k in &keys {
            let k = k.as_bytes();
            assert_eq!(decide(Stage::Legacy, k), Side::Legacy);
            assert_eq!(decide(Stage::Shadow, k), Side::Legacy);
            assert_eq!(decide(Stage::Target, k), Side::Target);
            assert_eq!(decide(Stage::Complete, k), Side::Target);
            // At 10%, the buckets below 10 are the target's.
            let expected = if bucket(k) < 10 {
                Side::Target
            } else {
                Side::Legacy
            };
            assert_eq!(decide(cutover(10), k), expected);
        }
    }

    #[test]
    fn a_key_in_text_or_binary_falls_in_one_bucket() {
        assert_eq!(&*key_text(true, &42i64.to_be_bytes()), b"42");
        assert_eq!(&*key_text(true, &42i32.to_be_bytes()), b"42");
        assert_eq!(&*key_text(true, &(-42i16).to_be_bytes()), b"-42");
        assert_eq!(
            &*key_text(true, &i64::MIN.to_be_bytes()),
            b"-9223372036854775808"
        );
        assert_eq!(&*key_text(false, b"42"), b"42");
        assert_eq!(
            bucket(&key_text(true, &(-7i64).to_be_bytes())),
            bucket(&key_text(false, b"-7"))
        );
        assert_eq!(&*key_text(true, b"abc"), b"abc");
    }
}
