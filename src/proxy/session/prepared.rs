//! The names of prepared statements on the server: the target variants the proxy prepares
//! beside the client's statements (`cutover_t_` and the client's name in hex), errors that
//! name a variant given the client's name back, and the SQL that drops statements
//! (`DEALLOCATE`, `DISCARD ALL`).

use bytes::Bytes;

use crate::wire::messages;

/// Prefix of the names of the target variants the proxy prepares (`cutover_t_` and the
/// client's statement name in hex).
pub const TARGET_PREFIX: &str = "cutover_t_";

/// An ErrorResponse that names a target variant (`cutover_t_<hex>`: a Bind of a statement
/// the server no longer has, after the client's `DEALLOCATE ALL`) with the client's own
/// statement name instead; `None` when it names none.
pub fn error_with_client_names(body: &[u8]) -> Option<Bytes> {
    memchr::memmem::find(body, TARGET_PREFIX.as_bytes())?;
    let renamed: Vec<(u8, Vec<u8>)> = messages::error_field_list(body)
        .map(|(kind, value)| (kind, client_names(value)))
        .collect();
    Some(messages::error_frame(
        renamed.iter().map(|(k, v)| (*k, v.as_slice())),
    ))
}

/// `value` with every `cutover_t_<hex>` replaced by the name the hex spells.
fn client_names(value: &[u8]) -> Vec<u8> {
    let prefix = TARGET_PREFIX.as_bytes();
    let mut out = Vec::with_capacity(value.len());
    let mut rest = value;
    while let Some(at) = memchr::memmem::find(rest, prefix) {
        out.extend_from_slice(&rest[..at]);
        let after = &rest[at + prefix.len()..];
        let digits = after.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        match hex::decode(&after[..digits - digits % 2]) {
            Ok(name) if digits > 0 => {
                out.extend_from_slice(&name);
                rest = &after[digits - digits % 2..];
            }
            _ => {
                out.extend_from_slice(prefix);
                rest = after;
            }
        }
    }
    out.extend_from_slice(rest);
    out
}

/// What a simple Query's `DEALLOCATE [PREPARE] name | ALL` or `DISCARD ALL` drops of the
/// session's prepared statements: `Some(None)` all of them, `Some(Some(name))` one.
pub(super) fn deallocates(sql: &[u8]) -> Option<Option<Vec<u8>>> {
    // Every simple Query passes here: look at its first letter before decoding anything.
    let first = sql.iter().find(|b| !b.is_ascii_whitespace())?;
    if !first.eq_ignore_ascii_case(&b'd') {
        return None;
    }
    let text = std::str::from_utf8(sql).ok()?;
    let mut words = text
        .split(|c: char| c.is_whitespace() || c == ';')
        .filter(|w| !w.is_empty());
    let first = words.next()?;
    if first.eq_ignore_ascii_case("discard") {
        return words.next()?.eq_ignore_ascii_case("all").then_some(None);
    }
    if !first.eq_ignore_ascii_case("deallocate") {
        return None;
    }
    let mut name = words.next()?;
    if name.eq_ignore_ascii_case("prepare") {
        name = words.next()?;
    }
    if name.eq_ignore_ascii_case("all") {
        return Some(None);
    }
    Some(Some(
        match name.strip_prefix('"').and_then(|n| n.strip_suffix('"')) {
            Some(quoted) => quoted.replace("\"\"", "\"").into_bytes(),
            None => name.to_ascii_lowercase().into_bytes(),
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn variant_names_read_as_the_client_s() {
        let variant = format!("{TARGET_PREFIX}{}", hex::encode("_pg3_0"));
        let message = format!("prepared statement \"{variant}\" does not exist");
        assert_eq!(
            client_names(message.as_bytes()),
            b"prepared statement \"_pg3_0\" does not exist"
        );
        assert_eq!(client_names(b"no variant here"), b"no variant here");
        assert_eq!(client_names(b"cutover_t_ alone"), b"cutover_t_ alone");
        let body = messages::error_frame([(b'C', b"26000".as_slice()), (b'M', message.as_bytes())]);
        let renamed = error_with_client_names(&body[5..]).expect("it names a variant");
        assert!(memchr::memmem::find(&renamed, b"\"_pg3_0\"").is_some());
        assert!(error_with_client_names(b"C26000\0Mplain\0\0").is_none());
    }

    #[test]
    fn deallocations_are_read() {
        assert_eq!(deallocates(b"DEALLOCATE ALL"), Some(None));
        assert_eq!(deallocates(b"discard all;"), Some(None));
        assert_eq!(deallocates(b"DISCARD PLANS"), None);
        assert_eq!(
            deallocates(b"deallocate prepare S1"),
            Some(Some(b"s1".to_vec()))
        );
        assert_eq!(
            deallocates(b"DEALLOCATE \"S1\""),
            Some(Some(b"S1".to_vec()))
        );
        assert_eq!(
            deallocates(b" DEALLOCATE _pg3_0"),
            Some(Some(b"_pg3_0".to_vec()))
        );
        assert_eq!(deallocates(b"SELECT 1"), None);
    }
}
