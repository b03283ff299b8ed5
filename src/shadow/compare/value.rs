//! Values as comparison sees them: decoded from the server's binary format by type into a
//! canonical form where equal values are equal bytes — whatever the width of an integer
//! (int4 `7` = int8 `7`), the scale of a numeric (`10.5` = `10.50`), the key order of a
//! jsonb object, or whether a number came as an integer or a numeric. Anything this module
//! does not know is compared byte for byte.

use fallible_iterator::FallibleIterator;
use rust_decimal::Decimal;
use tokio_postgres::types::{FromSql, Type};

/// A canonical value: derive-ordered, hashable, equal exactly when the values are equal.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    Null,
    Bool(bool),
    /// Every exact number (integers of any width, numerics), scale normalized.
    Number(Decimal),
    /// Floating point, by its bits (after folding -0.0 into 0.0 and every NaN into one).
    Float(u64),
    Text(String),
    /// Microseconds since 2000-01-01 (timestamp and timestamptz alike, as sent).
    Timestamp(i64),
    /// Days since 2000-01-01.
    Date(i32),
    /// JSON re-serialized with sorted keys.
    Json(String),
    Bytes(Vec<u8>),
    /// Dimensions (length, lower bound), then the elements in row-major order.
    Array(Vec<(i32, i32)>, Vec<Value>),
    /// A type this module does not decode: its binary form.
    Raw(Vec<u8>),
}

impl Value {
    /// Decodes one column of a row (binary format) of type `ty`; `None` is SQL NULL.
    pub fn decode(ty: &Type, raw: Option<&[u8]>) -> Value {
        let Some(raw) = raw else { return Value::Null };
        Self::decode_non_null(ty, raw).unwrap_or_else(|| Value::Raw(raw.to_vec()))
    }

    fn decode_non_null(ty: &Type, raw: &[u8]) -> Option<Value> {
        let be_i64 = |b: &[u8]| b.try_into().ok().map(i64::from_be_bytes);
        Some(match *ty {
            Type::BOOL => Value::Bool(*raw.first()? != 0),
            Type::INT2 => Value::Number(Decimal::from(i16::from_be_bytes(raw.try_into().ok()?))),
            Type::INT4 => Value::Number(Decimal::from(i32::from_be_bytes(raw.try_into().ok()?))),
            Type::INT8 => Value::Number(Decimal::from(be_i64(raw)?)),
            Type::OID => Value::Number(Decimal::from(u32::from_be_bytes(raw.try_into().ok()?))),
            Type::NUMERIC => Value::Number(Decimal::from_sql(ty, raw).ok()?.normalize()),
            Type::FLOAT4 => Value::float(f64::from(f32::from_be_bytes(raw.try_into().ok()?))),
            Type::FLOAT8 => Value::float(f64::from_be_bytes(raw.try_into().ok()?)),
            Type::TEXT | Type::VARCHAR | Type::BPCHAR | Type::NAME | Type::UNKNOWN => {
                Value::Text(std::str::from_utf8(raw).ok()?.to_owned())
            }
            Type::TIMESTAMP | Type::TIMESTAMPTZ => Value::Timestamp(be_i64(raw)?),
            Type::DATE => Value::Date(i32::from_be_bytes(raw.try_into().ok()?)),
            Type::JSON => Value::json(raw)?,
            Type::JSONB => Value::json(raw.strip_prefix(&[1])?)?,
            Type::BYTEA => Value::Bytes(raw.to_vec()),
            _ => match ty.kind() {
                tokio_postgres::types::Kind::Array(element) => Value::array(element, raw)?,
                _ => return None,
            },
        })
    }

    fn float(f: f64) -> Value {
        let canonical = if f.is_nan() {
            f64::NAN
        } else if f == 0.0 {
            0.0
        } else {
            f
        };
        Value::Float(canonical.to_bits())
    }

    fn json(text: &[u8]) -> Option<Value> {
        let parsed: serde_json::Value = serde_json::from_slice(text).ok()?;
        Some(Value::Json(parsed.to_string()))
    }

    fn array(element: &Type, raw: &[u8]) -> Option<Value> {
        let array = postgres_protocol::types::array_from_sql(raw).ok()?;
        let dims = array
            .dimensions()
            .map(|d| Ok((d.len, d.lower_bound)))
            .collect::<Vec<_>>()
            .ok()?;
        let values = array
            .values()
            .map(|v| Ok(Value::decode(element, v)))
            .collect::<Vec<_>>()
            .ok()?;
        Some(Value::Array(dims, values))
    }

    /// The float or exact number this value holds, if any.
    pub fn as_f64(&self) -> Option<f64> {
        match self {
            Value::Float(bits) => Some(f64::from_bits(*bits)),
            Value::Number(d) => d.to_string().parse().ok(),
            _ => None,
        }
    }
}

impl std::fmt::Display for Value {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Value::Null => f.write_str("NULL"),
            Value::Bool(b) => write!(f, "{b}"),
            Value::Number(d) => write!(f, "{d}"),
            Value::Float(bits) => write!(f, "{}", f64::from_bits(*bits)),
            Value::Text(s) => write!(f, "{s:?}"),
            Value::Timestamp(us) => write!(f, "timestamp {us}µs after 2000-01-01"),
            Value::Date(d) => write!(f, "date {d}d after 2000-01-01"),
            Value::Json(j) => f.write_str(j),
            Value::Bytes(b) | Value::Raw(b) => write!(f, "\\x{}", hex::encode(b)),
            Value::Array(_, values) => {
                f.write_str("{")?;
                for (i, v) in values.iter().enumerate() {
                    if i > 0 {
                        f.write_str(",")?;
                    }
                    write!(f, "{v}")?;
                }
                f.write_str("}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn integers_of_any_width_and_numerics_of_any_scale_agree() {
        let four = Value::decode(&Type::INT4, Some(&7i32.to_be_bytes()));
        let eight = Value::decode(&Type::INT8, Some(&7i64.to_be_bytes()));
        assert_eq!(four, eight);
        let mut a = bytes::BytesMut::new();
        let mut b = bytes::BytesMut::new();
        use tokio_postgres::types::ToSql;
        "10.5"
            .parse::<Decimal>()
            .unwrap()
            .to_sql(&Type::NUMERIC, &mut a)
            .unwrap();
        "10.50"
            .parse::<Decimal>()
            .unwrap()
            .to_sql(&Type::NUMERIC, &mut b)
            .unwrap();
        assert_eq!(
            Value::decode(&Type::NUMERIC, Some(&a)),
            Value::decode(&Type::NUMERIC, Some(&b))
        );
        let mut c = bytes::BytesMut::new();
        Decimal::from(7).to_sql(&Type::NUMERIC, &mut c).unwrap();
        assert_eq!(Value::decode(&Type::NUMERIC, Some(&c)), four);
    }

    #[test]
    fn nulls_json_and_floats() {
        assert_eq!(Value::decode(&Type::TEXT, None), Value::Null);
        assert_ne!(
            Value::decode(&Type::TEXT, None),
            Value::decode(&Type::TEXT, Some(b""))
        );
        let j1 = Value::decode(&Type::JSONB, Some(b"\x01{\"b\": 1, \"a\": [1, 2]}"));
        let j2 = Value::decode(&Type::JSON, Some(b"{\"a\":[1,2],\"b\":1}"));
        assert_eq!(j1, j2);
        assert_eq!(
            Value::decode(&Type::FLOAT8, Some(&(-0.0f64).to_be_bytes())),
            Value::decode(&Type::FLOAT8, Some(&0.0f64.to_be_bytes()))
        );
    }
}
