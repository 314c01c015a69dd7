//! Kafka header names and encodings, wire-compatible with tomorrow-one/transactional-outbox so
//! that its consumers keep working.
//!
//! - [`SEQUENCE`] (`x-sequence`): the message's outbox sequence (its row id), as an 8-byte
//!   big-endian signed integer. It is **unique per message** within one outbox (one source) and
//!   is kept when a message is republished, so consumers can deduplicate on
//!   (`x-source`, `x-sequence`). It is **not** a high-water mark: sequences are assigned when a
//!   transaction inserts the row, and transactions commit in any order, so a consumer may see
//!   sequence 11 before sequence 10 for messages of different keys (and of the same key when the
//!   two transactions were concurrent). A consumer must never drop a message because its
//!   sequence is lower than one it has seen.
//! - [`SOURCE`] (`x-source`): the configured source name, UTF-8.
//! - [`VALUE_TYPE`] (`x-value-type`): the payload's type name, set by typed helpers.

use base64::Engine as _;
use serde_json::{json, Value};

use crate::message::Header;

/// Header carrying the outbox sequence, 8-byte big-endian signed.
pub const SEQUENCE: &str = "x-sequence";
/// Header carrying the source (the publishing service), UTF-8.
pub const SOURCE: &str = "x-source";
/// Header carrying the payload's type name.
pub const VALUE_TYPE: &str = "x-value-type";

/// Headers the relay sets on every record; messages cannot carry their own.
pub const RESERVED: [&str; 2] = [SEQUENCE, SOURCE];

/// Encodes a sequence as the `x-sequence` header value.
pub fn encode_sequence(sequence: i64) -> [u8; 8] {
    sequence.to_be_bytes()
}

/// Why an `x-sequence` header value could not be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("the x-sequence header is {len} bytes long; expected 8 (big-endian signed integer)")]
pub struct MalformedSequence {
    /// Length of the value found.
    pub len: usize,
}

/// Decodes an `x-sequence` header value; a malformed value is an error, never a panic.
pub fn decode_sequence(value: &[u8]) -> Result<i64, MalformedSequence> {
    let bytes: [u8; 8] = value
        .try_into()
        .map_err(|_| MalformedSequence { len: value.len() })?;
    Ok(i64::from_be_bytes(bytes))
}

/// Headers are stored as `[{"name": n, "text": v}]`, or `"base64"` for values that are not
/// UTF-8 or hold a NUL (which PostgreSQL's JSON cannot store), so that operators can read them
/// with psql and SQL writers can produce them.
pub(crate) fn encode_stored(headers: &[Header]) -> Option<Value> {
    if headers.is_empty() {
        return None;
    }
    let encoded = headers
        .iter()
        .map(|h| match std::str::from_utf8(&h.value) {
            Ok(text) if !text.contains('\0') => json!({ "name": h.name, "text": text }),
            _ => json!({
                "name": h.name,
                "base64": base64::engine::general_purpose::STANDARD.encode(&h.value),
            }),
        })
        .collect();
    Some(Value::Array(encoded))
}

/// Stored headers the relay cannot publish: not the shape the writers store, or naming a
/// header the relay sets itself.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("malformed stored outbox headers: {0}")]
pub struct MalformedHeaders(String);

/// Reads the headers column as the writers store it (`[{"name": n, "text": v}]`, or `"base64"`
/// for values that are not UTF-8); a row written by hand in another shape, or naming a reserved
/// header, is an error, never a panic.
#[doc(hidden)] // the relay's; not part of the API
pub fn decode_stored(value: Option<Value>) -> Result<Vec<Header>, MalformedHeaders> {
    let Some(value) = value else {
        return Ok(Vec::new());
    };
    let Value::Array(items) = value else {
        return Err(MalformedHeaders(format!(
            "expected an array, found {value}"
        )));
    };
    items
        .into_iter()
        .map(|item| {
            let name = item["name"]
                .as_str()
                .filter(|name| !name.is_empty())
                .ok_or_else(|| MalformedHeaders(format!("header without a name: {item}")))?;
            if RESERVED.contains(&name) {
                return Err(MalformedHeaders(format!(
                    "header {name:?} is reserved: the relay sets it"
                )));
            }
            let value = if let Some(text) = item["text"].as_str() {
                text.as_bytes().to_vec()
            } else if let Some(b64) = item["base64"].as_str() {
                base64::engine::general_purpose::STANDARD
                    .decode(b64)
                    .map_err(|e| MalformedHeaders(format!("header {name:?}: {e}")))?
            } else {
                return Err(MalformedHeaders(format!(
                    "header {name:?} has no text or base64 value: {item}"
                )));
            };
            Ok(Header {
                name: name.to_owned(),
                value,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sequence_is_eight_bytes_big_endian() {
        assert_eq!(encode_sequence(1), [0, 0, 0, 0, 0, 0, 0, 1]);
        assert_eq!(
            encode_sequence(0x0102_0304_0506_0708),
            [1, 2, 3, 4, 5, 6, 7, 8]
        );
        assert_eq!(decode_sequence(&encode_sequence(-5)), Ok(-5));
    }

    #[test]
    fn malformed_sequence_is_reported() {
        assert_eq!(
            decode_sequence(&[1, 2, 3]),
            Err(MalformedSequence { len: 3 })
        );
        assert_eq!(decode_sequence(&[]), Err(MalformedSequence { len: 0 }));
    }

    #[test]
    fn headers_round_trip_text_and_binary_in_order() {
        let headers = vec![
            Header {
                name: "traceparent".into(),
                value: b"00-abc-def-01".to_vec(),
            },
            Header {
                name: "bin".into(),
                value: vec![0, 159, 146, 150],
            },
            Header {
                name: "traceparent".into(),
                value: b"dup".to_vec(),
            },
        ];
        let stored = encode_stored(&headers);
        assert_eq!(stored.as_ref().unwrap()[0]["text"], "00-abc-def-01");
        assert!(stored.as_ref().unwrap()[1]["base64"].is_string());
        assert_eq!(decode_stored(stored).unwrap(), headers);
    }
}
