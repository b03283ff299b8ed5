//! The few messages the proxy decodes or builds, each as the protocol documentation
//! describes it (<https://www.postgresql.org/docs/current/protocol-message-formats.html>).
//! Bodies here exclude the type byte and length.

use bytes::{BufMut, Bytes, BytesMut};
use tokio_postgres::error::SqlState;

use super::{frame, take_cstr};

/// Frontend message types the proxy looks at.
pub mod frontend {
    pub const QUERY: u8 = b'Q';
    pub const PARSE: u8 = b'P';
    pub const BIND: u8 = b'B';
    pub const EXECUTE: u8 = b'E';
    pub const CLOSE: u8 = b'C';
    pub const TERMINATE: u8 = b'X';
    pub const SYNC: u8 = b'S';
    pub const FUNCTION_CALL: u8 = b'F';
    pub const DESCRIBE: u8 = b'D';
    pub const FLUSH: u8 = b'H';
}

/// Backend message types the proxy looks at.
pub mod backend {
    pub const AUTHENTICATION: u8 = b'R';
    pub const BACKEND_KEY_DATA: u8 = b'K';
    pub const ERROR_RESPONSE: u8 = b'E';
    pub const NOTICE_RESPONSE: u8 = b'N';
    pub const READY_FOR_QUERY: u8 = b'Z';
    pub const PARSE_COMPLETE: u8 = b'1';
    pub const ROW_DESCRIPTION: u8 = b'T';
    pub const NO_DATA: u8 = b'n';
    pub const CLOSE_COMPLETE: u8 = b'3';
    pub const DATA_ROW: u8 = b'D';
    pub const COMMAND_COMPLETE: u8 = b'C';
    pub const EMPTY_QUERY_RESPONSE: u8 = b'I';
}

/// Authentication request codes (the first Int32 of an `R` message).
pub const AUTH_OK: u32 = 0;
pub const AUTH_SASL: u32 = 10;

/// ErrorResponse severities the proxy emits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Severity {
    Error,
    Fatal,
}

impl Severity {
    fn as_str(self) -> &'static str {
        match self {
            Severity::Error => "ERROR",
            Severity::Fatal => "FATAL",
        }
    }
}

/// An ErrorResponse frame built by the proxy itself (errors from PostgreSQL are relayed
/// untouched, never rebuilt).
pub fn error_response(severity: Severity, code: &SqlState, message: &str) -> Bytes {
    error_frame([
        (b'S', severity.as_str().as_bytes()),
        (b'V', severity.as_str().as_bytes()),
        (b'C', code.code().as_bytes()),
        (b'M', message.as_bytes()),
    ])
}

/// An ErrorResponse frame with these fields (type, value), in this order.
pub fn error_frame<'a>(fields: impl IntoIterator<Item = (u8, &'a [u8])>) -> Bytes {
    let mut body = BytesMut::with_capacity(128);
    for (field, value) in fields {
        body.put_u8(field);
        body.put_slice(value);
        body.put_u8(0);
    }
    body.put_u8(0);
    frame(backend::ERROR_RESPONSE, &body)
}

/// The fields of an ErrorResponse or NoticeResponse body in order, as (type, value); ends
/// at the terminator or at a field cut short.
pub fn error_field_list(mut body: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (&kind, rest) = body.split_first()?;
        if kind == 0 {
            return None;
        }
        body = rest;
        Some((kind, take_cstr(&mut body)?))
    })
}

/// The fields of an ErrorResponse or NoticeResponse the proxy needs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct ErrorFields {
    /// The non-localized severity (`V`), or the localized one (`S`) from old servers.
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl ErrorFields {
    pub fn is_fatal(&self) -> bool {
        self.severity == "FATAL" || self.severity == "PANIC"
    }
}

pub fn parse_error(body: &[u8]) -> ErrorFields {
    let mut fields = ErrorFields::default();
    let mut localized = String::new();
    for (kind, value) in error_field_list(body) {
        let value = String::from_utf8_lossy(value).into_owned();
        match kind {
            b'V' => fields.severity = value,
            b'S' => localized = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
    }
    if fields.severity.is_empty() {
        fields.severity = localized;
    }
    fields
}

/// The authentication request code of an `R` message.
pub fn auth_code(body: &[u8]) -> Option<u32> {
    Some(u32::from_be_bytes(body.get(..4)?.try_into().ok()?))
}

/// The mechanisms an AuthenticationSASL offers (its body after the request code).
pub fn sasl_mechanisms(mut data: &[u8]) -> impl Iterator<Item = &[u8]> {
    std::iter::from_fn(move || take_cstr(&mut data).filter(|m| !m.is_empty()))
}

/// An AuthenticationSASL body without the `-PLUS` mechanisms: channel binding binds to the
/// TLS connection it runs on, and the client's TLS connection ends at the proxy.
/// `None` when there was nothing to strip.
pub fn sasl_without_channel_binding(body: &[u8]) -> Option<Bytes> {
    let mut kept = BytesMut::with_capacity(body.len());
    kept.put_slice(body.get(..4)?);
    let mut stripped = false;
    for mechanism in sasl_mechanisms(&body[4..]) {
        if mechanism.ends_with(b"-PLUS") {
            stripped = true;
            continue;
        }
        kept.put_slice(mechanism);
        kept.put_u8(0);
    }
    kept.put_u8(0);
    stripped.then(|| frame(backend::AUTHENTICATION, &kept))
}

/// BackendKeyData: the backend's process id and secret key (4 bytes in protocol 3.0, up to
/// 256 in 3.2).
pub fn parse_backend_key(body: &[u8]) -> Option<(u32, Bytes)> {
    let pid = u32::from_be_bytes(body.get(..4)?.try_into().ok()?);
    let secret = body.get(4..).filter(|s| !s.is_empty())?;
    Some((pid, Bytes::copy_from_slice(secret)))
}

pub fn backend_key_frame(pid: u32, secret: &[u8]) -> Bytes {
    let mut body = BytesMut::with_capacity(4 + secret.len());
    body.put_u32(pid);
    body.put_slice(secret);
    frame(backend::BACKEND_KEY_DATA, &body)
}

/// A CancelRequest packet for an upstream backend.
pub fn cancel_request(pid: u32, secret: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(12 + secret.len());
    out.put_u32(12 + secret.len() as u32);
    out.put_u32(super::CANCEL_REQUEST);
    out.put_u32(pid);
    out.put_slice(secret);
    out.freeze()
}

/// ReadyForQuery's transaction status: `I` idle, `T` in a transaction, `E` failed transaction.
pub fn ready_status(body: &[u8]) -> Option<u8> {
    body.first().copied()
}

/// The first value of a DataRow (`None` when NULL or malformed).
pub fn first_value(body: &[u8]) -> Option<&[u8]> {
    let count = i16::from_be_bytes(body.get(..2)?.try_into().ok()?);
    if count < 1 {
        return None;
    }
    let len = i32::from_be_bytes(body.get(2..6)?.try_into().ok()?);
    let len = usize::try_from(len).ok()?;
    body.get(6..6 + len)
}

/// The SQL text of a Query message.
pub fn query_text(body: &[u8]) -> Option<&[u8]> {
    let mut rest = body;
    take_cstr(&mut rest)
}

/// The statement name and SQL text of a Parse message.
pub fn parse_text(body: &[u8]) -> Option<(&[u8], &[u8])> {
    ParseMessage::read(body).map(|p| (p.name, p.sql))
}

/// A Parse message, its strings walked once: the statement name, the SQL text and its
/// declared parameter types.
pub struct ParseMessage<'a> {
    pub name: &'a [u8],
    pub sql: &'a [u8],
    /// The declared type OIDs' bytes, four each (none for a negative count); `None` if the
    /// body is shorter than its count says.
    declared: Option<&'a [u8]>,
}

impl<'a> ParseMessage<'a> {
    /// `None` if the name or the text breaks off.
    pub fn read(body: &'a [u8]) -> Option<Self> {
        let mut rest = body;
        let name = take_cstr(&mut rest)?;
        let sql = take_cstr(&mut rest)?;
        let declared =
            take_i16(&mut rest).and_then(|n| rest.get(..4 * usize::try_from(n).unwrap_or(0)));
        Some(Self {
            name,
            sql,
            declared,
        })
    }

    /// The parameter type OIDs (0: left to the server).
    pub fn param_types(&self) -> Option<Vec<u32>> {
        Some(
            self.declared?
                .chunks_exact(4)
                .map(|oid| u32::from_be_bytes([oid[0], oid[1], oid[2], oid[3]]))
                .collect(),
        )
    }

    /// Whether it declares exactly `types` (what [`Self::param_types`] would read), without
    /// building them.
    pub fn param_types_are(&self, types: &[u32]) -> bool {
        self.declared.is_some_and(|oids| {
            oids.len() == 4 * types.len()
                && types
                    .iter()
                    .zip(oids.chunks_exact(4))
                    .all(|(&t, oid)| oid == t.to_be_bytes())
        })
    }
}

/// Gives a RowDescription body each field's table OID, attribute number and type modifier
/// from `fields`, in place (name, type, length and format kept; the size does not change);
/// false, leaving it untouched, if the counts differ or the body is malformed.
pub fn describe_as(body: &mut [u8], fields: &[(u32, i16, i32)]) -> bool {
    let Some(count) = body.first_chunk::<2>() else {
        return false;
    };
    if usize::from(u16::from_be_bytes(*count)) != fields.len() {
        return false;
    }
    // Each field: its name, then table oid (4), attnum (2), type oid (4), typlen (2),
    // typmod (4), format (2). Walked once to check the body, once to change it.
    let fixed = |body: &[u8], at: usize| {
        let nul = super::nul(body.get(at..)?)?;
        let start = at + nul + 1;
        (body.len() >= start + 18).then_some(start)
    };
    let mut at = 2;
    for _ in fields {
        let Some(start) = fixed(body, at) else {
            return false;
        };
        at = start + 18;
    }
    let mut at = 2;
    for &(table_oid, attnum, typmod) in fields {
        let Some(start) = fixed(body, at) else {
            return false;
        };
        body[start..start + 4].copy_from_slice(&table_oid.to_be_bytes());
        body[start + 4..start + 6].copy_from_slice(&attnum.to_be_bytes());
        body[start + 12..start + 16].copy_from_slice(&typmod.to_be_bytes());
        at = start + 18;
    }
    true
}

/// A Query message for `sql`.
pub fn query_frame(sql: &str) -> Bytes {
    let mut body = Vec::with_capacity(sql.len() + 1);
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    super::frame(frontend::QUERY, &body)
}

/// A Parse message: statement `name`, `sql`, declared parameter types.
pub fn parse_frame(name: &[u8], sql: &str, param_types: &[u32]) -> Bytes {
    let mut body = Vec::with_capacity(name.len() + sql.len() + 4 + 4 * param_types.len());
    body.extend_from_slice(name);
    body.push(0);
    body.extend_from_slice(sql.as_bytes());
    body.push(0);
    // A statement has at most 65535 parameters (the protocol's own limit).
    body.extend_from_slice(&(param_types.len() as u16).to_be_bytes());
    for oid in param_types {
        body.extend_from_slice(&oid.to_be_bytes());
    }
    super::frame(frontend::PARSE, &body)
}

/// A Close message for prepared statement `name`.
pub fn close_statement_frame(name: &[u8]) -> Bytes {
    let mut body = Vec::with_capacity(name.len() + 2);
    body.push(b'S');
    body.extend_from_slice(name);
    body.push(0);
    super::frame(frontend::CLOSE, &body)
}

/// One bound parameter: binary format or not, and the value (`None` for NULL).
pub type BoundParam<'a> = (bool, Option<&'a [u8]>);

/// A Bind message's parameters.
pub fn bind_params(body: &[u8]) -> Option<Vec<BoundParam<'_>>> {
    bound_params(body)?.collect()
}

/// A Bind message's parameter `index` (from 0), read without allocating: the parameters
/// after it are not looked at.
pub fn bind_param(body: &[u8], index: usize) -> Option<BoundParam<'_>> {
    bound_params(body)?.nth(index)?
}

/// A Bind message's parameters one by one: each `None` if the message breaks off there.
fn bound_params(body: &[u8]) -> Option<BoundParams<'_>> {
    let mut rest = body;
    take_cstr(&mut rest)?;
    take_cstr(&mut rest)?;
    let formats = take_i16(&mut rest)?.max(0) as usize;
    let (codes, mut rest) = rest.split_at_checked(2 * formats)?;
    let count = take_i16(&mut rest)?.max(0) as usize;
    Some(BoundParams {
        codes,
        rest,
        next: 0,
        count,
    })
}

struct BoundParams<'a> {
    /// The format codes, two bytes each.
    codes: &'a [u8],
    /// The values from the next one on.
    rest: &'a [u8],
    next: usize,
    count: usize,
}

impl<'a> BoundParams<'a> {
    /// Parameter `i`, the next one; `None` if the message breaks off there.
    fn take(&mut self, i: usize) -> Option<BoundParam<'a>> {
        // No format code (all text), one for all, or one each.
        let binary = match self.codes.len() / 2 {
            0 => false,
            1 => *self.codes == [0, 1],
            _ => *self.codes.get(2 * i..2 * i + 2)? == [0, 1],
        };
        let (len, rest) = self.rest.split_first_chunk::<4>()?;
        let (value, rest) = match usize::try_from(i32::from_be_bytes(*len)) {
            Ok(len) => {
                let (value, rest) = rest.split_at_checked(len)?;
                (Some(value), rest)
            }
            // Negative: NULL.
            Err(_) => (None, rest),
        };
        self.rest = rest;
        Some((binary, value))
    }
}

impl<'a> Iterator for BoundParams<'a> {
    type Item = Option<BoundParam<'a>>;

    fn next(&mut self) -> Option<Self::Item> {
        if self.next == self.count {
            return None;
        }
        let param = self.take(self.next);
        // Broken off: nothing after it.
        self.next = if param.is_some() {
            self.next + 1
        } else {
            self.count
        };
        Some(param)
    }
}

fn take_i16(rest: &mut &[u8]) -> Option<i16> {
    let (n, tail) = rest.split_first_chunk::<2>()?;
    *rest = tail;
    Some(i16::from_be_bytes(*n))
}

/// The comment the proxy appends to a statement it classified as a write on the legacy
/// table (query type and fingerprint id, both `[a-z0-9_]`): the database's dual-write
/// trigger reads them back from it
/// (`cutover.statement_query_type()`, migration 0006). Appended, never prepended, so that
/// the positions in the server's error messages stay those of the client's text; on a line
/// of its own, so that a trailing `--` comment cannot swallow it.
pub fn query_type_tag(query_type: &str, fingerprint: &str) -> String {
    format!("\n/* cutover:{query_type} {fingerprint} */")
}

/// A Query message whose SQL text is `body`'s with `tag` appended.
pub fn tagged_query(body: &[u8], tag: &str) -> Option<Bytes> {
    let sql = query_text(body)?;
    let mut out = BytesMut::with_capacity(sql.len() + tag.len() + 1);
    out.put_slice(sql);
    out.put_slice(tag.as_bytes());
    out.put_u8(0);
    Some(frame(frontend::QUERY, &out))
}

/// A Parse message whose SQL text is `body`'s with `tag` appended (name and parameter
/// types kept).
pub fn tagged_parse(body: &[u8], tag: &str) -> Option<Bytes> {
    let (name, sql) = parse_text(body)?;
    let rest = &body[name.len() + sql.len() + 2..];
    let mut out = BytesMut::with_capacity(body.len() + tag.len());
    out.put_slice(name);
    out.put_u8(0);
    out.put_slice(sql);
    out.put_slice(tag.as_bytes());
    out.put_u8(0);
    out.put_slice(rest);
    Some(frame(frontend::PARSE, &out))
}

/// What the dual-write trigger reported about one statement, in a NOTICE meant for the
/// proxy alone (SQLSTATE class `CV`, migration 0006).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DualWriteReport {
    pub outcome: DualWriteOutcome,
    pub query_type: String,
    pub rows: u64,
    /// Client statements the report covers (a COMMIT reports for every statement of its
    /// transaction).
    pub statements: u64,
    /// Time spent writing the legacy table, and the target, in microseconds (for all the
    /// statements together).
    pub legacy_us: u64,
    pub target_us: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DualWriteOutcome {
    /// Both sides written.
    Mirrored,
    /// The mirrored side failed; recorded for repair, the client's statement went on.
    Isolated,
    /// The mirrored side failed and the query type is strict: the statement failed.
    StrictFailed,
    /// A backfill is running: its keys were handed to it, to be synced when it ends.
    Deferred,
}

impl DualWriteOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            DualWriteOutcome::Mirrored => "mirrored",
            DualWriteOutcome::Isolated => "isolated_failure",
            DualWriteOutcome::StrictFailed => "strict_failure",
            DualWriteOutcome::Deferred => "deferred_to_backfill",
        }
    }
}

/// The report in a NoticeResponse body, if it is one of the trigger's.
pub fn dual_write_report(body: &[u8]) -> Option<DualWriteReport> {
    let fields = parse_error(body);
    let outcome = match fields.code.as_str() {
        "CV000" => DualWriteOutcome::Mirrored,
        "CV001" => DualWriteOutcome::Isolated,
        "CV002" => DualWriteOutcome::StrictFailed,
        "CV003" => DualWriteOutcome::Deferred,
        _ => return None,
    };
    let rest = fields.message.strip_prefix("cutover dual-write ")?;
    let mut report = DualWriteReport {
        outcome,
        query_type: String::new(),
        rows: 0,
        statements: 1,
        legacy_us: 0,
        target_us: 0,
    };
    for pair in rest.split(' ') {
        let (key, value) = pair.split_once('=')?;
        match key {
            "qt" => report.query_type = value.to_owned(),
            "rows" => report.rows = value.parse().ok()?,
            "statements" => report.statements = value.parse().ok()?,
            "legacy_us" => report.legacy_us = value.parse().ok()?,
            "target_us" => report.target_us = value.parse().ok()?,
            _ => {}
        }
    }
    Some(report)
}

/// The portal and statement names at the start of a Bind message (the rest need not be
/// there).
#[inline]
pub fn bind_names(body: &[u8]) -> Option<(&[u8], &[u8])> {
    let mut rest = body;
    let portal = take_cstr(&mut rest)?;
    let statement = take_cstr(&mut rest)?;
    Some((portal, statement))
}

/// The portal name of an Execute message.
#[inline]
pub fn execute_portal(body: &[u8]) -> Option<&[u8]> {
    let mut rest = body;
    take_cstr(&mut rest)
}

/// What a Close message closes: `S` (statement) or `P` (portal), and its name.
#[inline]
pub fn close_target(body: &[u8]) -> Option<(u8, &[u8])> {
    let (&kind, mut rest) = body.split_first()?;
    Some((kind, take_cstr(&mut rest)?))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bind_parameters_and_parse_types() {
        // Bind "" "s1": formats [1], params [int8 7, NULL], result formats [].
        let mut body = b"\0s1\0".to_vec();
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&1i16.to_be_bytes());
        body.extend_from_slice(&2i16.to_be_bytes());
        body.extend_from_slice(&8i32.to_be_bytes());
        body.extend_from_slice(&7i64.to_be_bytes());
        body.extend_from_slice(&(-1i32).to_be_bytes());
        body.extend_from_slice(&0i16.to_be_bytes());
        let params = bind_params(&body).unwrap();
        assert_eq!(params.len(), 2);
        assert_eq!(params[0], (true, Some(&7i64.to_be_bytes()[..])));
        assert_eq!(params[1], (true, None));
        // Truncated: refused, not misread.
        assert!(bind_params(&body[..body.len() - 8]).is_none());
        // One at a time: the same values; past the last, or where it breaks off, none.
        assert_eq!(bind_param(&body, 0), Some(params[0]));
        assert_eq!(bind_param(&body, 1), Some(params[1]));
        assert_eq!(bind_param(&body, 2), None);
        assert_eq!(bind_param(&body[..body.len() - 8], 1), None);
        // A format code for each parameter, the first text.
        let mut two = b"\0s1\0".to_vec();
        for n in [2i16, 0, 1, 2] {
            two.extend_from_slice(&n.to_be_bytes());
        }
        two.extend_from_slice(&1i32.to_be_bytes());
        two.push(b'7');
        two.extend_from_slice(&(-1i32).to_be_bytes());
        assert_eq!(bind_param(&two, 0), Some((false, Some(&b"7"[..]))));
        assert_eq!(bind_param(&two, 1), Some((true, None)));
        assert_eq!(bind_params(&two).unwrap().len(), 2);

        let mut parse = b"s1\0SELECT $1\0".to_vec();
        parse.extend_from_slice(&1i16.to_be_bytes());
        parse.extend_from_slice(&20u32.to_be_bytes());
        let param_types = |body: &[u8]| ParseMessage::read(body)?.param_types();
        assert_eq!(param_types(&parse), Some(vec![20]));
        // A negative count declares nothing (the server refuses such a Parse).
        let mut negative = b"s1\0SELECT 1\0".to_vec();
        negative.extend_from_slice(&(-1i16).to_be_bytes());
        assert_eq!(param_types(&negative), Some(vec![]));
        assert!(ParseMessage::read(&negative).is_some_and(|p| p.param_types_are(&[])));
    }

    proptest::proptest! {
        /// A Parse declares `types` exactly when `param_types` reads `types` from it,
        /// truncated Parses included.
        #[test]
        fn param_types_are_what_is_read(
            declared in proptest::collection::vec(proptest::sample::select(vec![0u32, 20, 23, 25]), 0..4),
            asked in proptest::collection::vec(proptest::sample::select(vec![0u32, 20, 23, 25]), 0..4),
            cut in 0usize..8,
        ) {
            let mut parse = b"\0SELECT $1\0".to_vec();
            parse.extend_from_slice(&(declared.len() as i16).to_be_bytes());
            for oid in &declared {
                parse.extend_from_slice(&oid.to_be_bytes());
            }
            let parse = &parse[..parse.len().saturating_sub(cut)];
            let message = ParseMessage::read(parse);
            let read = message.as_ref().and_then(ParseMessage::param_types);
            let declares = |types: &[u32]| message.as_ref().is_some_and(|p| p.param_types_are(types));
            proptest::prop_assert_eq!(declares(&asked), read.as_deref() == Some(&asked[..]));
            if let Some(read) = read {
                proptest::prop_assert!(declares(&read));
            }
        }
    }

    fn body(frame: &Bytes) -> &[u8] {
        &frame[5..]
    }

    /// A RowDescription body: (name, table oid, attnum, type oid, typlen, typmod, format).
    fn row_description(fields: &[(&str, u32, i16, u32, i16, i32, i16)]) -> Vec<u8> {
        let mut b = (fields.len() as u16).to_be_bytes().to_vec();
        for &(name, table, attnum, oid, len, typmod, format) in fields {
            b.extend_from_slice(name.as_bytes());
            b.push(0);
            b.extend_from_slice(&table.to_be_bytes());
            b.extend_from_slice(&attnum.to_be_bytes());
            b.extend_from_slice(&oid.to_be_bytes());
            b.extend_from_slice(&len.to_be_bytes());
            b.extend_from_slice(&typmod.to_be_bytes());
            b.extend_from_slice(&format.to_be_bytes());
        }
        b
    }

    #[test]
    fn row_descriptions_take_legacy_identities_in_place() {
        let target = [
            ("affiliate_id", 99, 1, 20, 8, -1, 1),
            ("name", 99, 4, 1043, -1, 104, 0),
        ];
        let mut b = row_description(&target);
        assert!(describe_as(&mut b, &[(16384, 1, -1), (16384, 4, 104 + 4)]));
        assert_eq!(
            b,
            row_description(&[
                ("affiliate_id", 16384, 1, 20, 8, -1, 1),
                ("name", 16384, 4, 1043, -1, 108, 0),
            ])
        );
        // Another count, or a body cut anywhere: refused, and not a byte changed.
        let mut b = row_description(&target);
        assert!(!describe_as(&mut b, &[(1, 1, 1)]));
        for cut in 0..b.len() {
            let mut short = b[..cut].to_vec();
            assert!(!describe_as(&mut short, &[(1, 1, 1), (2, 2, 2)]), "{cut}");
            assert_eq!(short, &b[..cut]);
        }
    }

    #[test]
    fn built_errors_parse_back() {
        let f = error_response(Severity::Fatal, &SqlState::TOO_MANY_CONNECTIONS, "full");
        assert_eq!(f[0], b'E');
        let fields = parse_error(body(&f));
        assert_eq!(fields.code, "53300");
        assert_eq!(fields.message, "full");
        assert!(fields.is_fatal());
    }

    #[test]
    fn tags_are_appended_and_everything_else_kept() {
        let tag = query_type_tag("record_deposit", "fp_0123abcd");
        let q = tagged_query(b"UPDATE affiliates SET x = 1 -- note\0", &tag).unwrap();
        assert_eq!(q[0], b'Q');
        assert_eq!(
            query_text(body(&q)).unwrap(),
            b"UPDATE affiliates SET x = 1 -- note\n/* cutover:record_deposit fp_0123abcd */"
        );
        assert_eq!(
            u32::from_be_bytes(q[1..5].try_into().unwrap()) as usize,
            q.len() - 1
        );

        let mut parse = BytesMut::new();
        parse.put_slice(b"s1\0DELETE FROM affiliates WHERE affiliate_id = $1\0");
        parse.put_u16(1);
        parse.put_u32(20);
        let p = tagged_parse(&parse, &tag).unwrap();
        let (name, sql) = parse_text(body(&p)).unwrap();
        assert_eq!(name, b"s1");
        assert!(sql.ends_with(b"$1\n/* cutover:record_deposit fp_0123abcd */"));
        assert_eq!(&body(&p)[body(&p).len() - 6..], &[0, 1, 0, 0, 0, 20]);
    }

    fn notice(code: &str, message: &str) -> Vec<u8> {
        let mut b = Vec::new();
        for (k, v) in [
            (b'S', "NOTICE"),
            (b'V', "NOTICE"),
            (b'C', code),
            (b'M', message),
        ] {
            b.push(k);
            b.extend_from_slice(v.as_bytes());
            b.push(0);
        }
        b.push(0);
        b
    }

    #[test]
    fn dual_write_reports_are_recognized_and_nothing_else() {
        let r = dual_write_report(&notice(
            "CV001",
            "cutover dual-write qt=new_affiliate rows=3 statements=2 legacy_us=120 target_us=900",
        ))
        .unwrap();
        assert_eq!(r.outcome, DualWriteOutcome::Isolated);
        assert_eq!(
            (
                r.query_type.as_str(),
                r.rows,
                r.statements,
                r.legacy_us,
                r.target_us
            ),
            ("new_affiliate", 3, 2, 120, 900)
        );
        // An application's own notice, even with a look-alike code, is the client's.
        assert_eq!(
            dual_write_report(&notice("00000", "cutover dual-write qt=x")),
            None
        );
        assert_eq!(dual_write_report(&notice("CV000", "something else")), None);
        assert_eq!(
            dual_write_report(&notice("CV000", "cutover dual-write rows=x")),
            None
        );
    }

    #[test]
    fn plus_mechanisms_are_stripped() {
        let mut b = BytesMut::new();
        b.put_u32(AUTH_SASL);
        b.put_slice(b"SCRAM-SHA-256-PLUS\0SCRAM-SHA-256\0\0");
        let stripped = sasl_without_channel_binding(&b).expect("had a -PLUS");
        assert_eq!(&stripped[5..], b"\0\0\0\x0aSCRAM-SHA-256\0\0");

        let mut plain = BytesMut::new();
        plain.put_u32(AUTH_SASL);
        plain.put_slice(b"SCRAM-SHA-256\0\0");
        assert_eq!(sasl_without_channel_binding(&plain), None);
    }

    #[test]
    fn keys_and_cancels() {
        let f = backend_key_frame(7, &[9, 9, 9, 9]);
        assert_eq!(
            parse_backend_key(body(&f)),
            Some((7, Bytes::from_static(&[9, 9, 9, 9])))
        );
        assert_eq!(parse_backend_key(&[0, 0, 0, 7]), None);
        let c = cancel_request(7, &[1, 2, 3, 4]);
        assert_eq!(c.len(), 16);
    }

    #[test]
    fn statement_texts() {
        assert_eq!(query_text(b"SELECT 1\0"), Some(&b"SELECT 1"[..]));
        assert_eq!(
            parse_text(b"s1\0SELECT $1\0\0\0"),
            Some((&b"s1"[..], &b"SELECT $1"[..]))
        );
        assert_eq!(parse_text(b"s1"), None);
        assert_eq!(
            bind_names(b"p1\0s1\0\0\x01"),
            Some((&b"p1"[..], &b"s1"[..]))
        );
        assert_eq!(execute_portal(b"\0\0\0\0\0"), Some(&b""[..]));
        assert_eq!(close_target(b"Sname\0"), Some((b'S', &b"name"[..])));
    }
}
