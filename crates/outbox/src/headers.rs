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
}
