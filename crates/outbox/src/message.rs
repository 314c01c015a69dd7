use crate::error::InvalidMessage;
use crate::headers;

/// A message to publish: the Kafka topic, an optional key (which picks the partition and so the
/// order), the payload and user headers.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Message {
    pub(crate) topic: String,
    pub(crate) key: Option<Vec<u8>>,
    pub(crate) payload: Option<Vec<u8>>,
    pub(crate) headers: Vec<Header>,
}

/// A Kafka header: a name and raw bytes. Names may repeat, as in Kafka.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Header {
    /// Header name.
    pub name: String,
    /// Header value.
    pub value: Vec<u8>,
}

impl Message {
    /// A message for `topic` carrying `payload`, without key or headers.
    pub fn new(topic: impl Into<String>, payload: impl Into<Vec<u8>>) -> Self {
        Message {
            topic: topic.into(),
            key: None,
            payload: Some(payload.into()),
            headers: Vec::new(),
        }
    }

    /// A tombstone (a record without a value) for `key`, as compacted topics use for deletion.
    pub fn tombstone(topic: impl Into<String>, key: impl Into<Vec<u8>>) -> Self {
        Message {
            topic: topic.into(),
            key: Some(key.into()),
            payload: None,
            headers: Vec::new(),
        }
    }

    /// Sets the key: bytes, or a string (its UTF-8 bytes). Messages with the same key go to the
    /// same partition and are published in order.
    pub fn key(mut self, key: impl Into<Vec<u8>>) -> Self {
        self.key = Some(key.into());
        self
    }

    /// Adds a header.
    pub fn header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push(Header {
            name: name.into(),
            value: value.into(),
        });
        self
    }

    /// The topic.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The key, if any.
    pub fn key_bytes(&self) -> Option<&[u8]> {
        self.key.as_deref()
    }

    /// The payload; `None` for a tombstone.
    pub fn payload(&self) -> Option<&[u8]> {
        self.payload.as_deref()
    }

    /// The user headers.
    pub fn headers(&self) -> &[Header] {
        &self.headers
    }

    /// The record's size as the relay's producer counts it, with the relay's headers.
    fn size(&self) -> usize {
        record_wire_size(
            self.key.as_ref().map_or(0, Vec::len),
            self.payload.as_ref().map_or(0, Vec::len),
            self.headers
                .iter()
                .map(|h| (h.name.len(), h.value.len()))
                .chain(relay_headers()),
        )
    }

    /// Checks what can be known at save time, so that a message the relay could never publish
    /// is rejected while the caller can still roll back.
    pub(crate) fn validate(&self, max_bytes: usize) -> Result<(), InvalidMessage> {
        validate_topic(&self.topic)?;
        for header in &self.headers {
            if header.name.is_empty() {
                return Err(InvalidMessage::EmptyHeaderName);
            }
            if header.name.contains('\0') {
                return Err(InvalidMessage::NulInHeaderName {
                    name: header.name.escape_default().to_string(),
                });
            }
            if headers::RESERVED.contains(&header.name.as_str()) {
                return Err(InvalidMessage::ReservedHeader {
                    name: header.name.clone(),
                });
            }
            validate_header_value(header)?;
        }
        let size = self.size();
        if size > max_bytes {
            return Err(InvalidMessage::TooLarge {
                size,
                max: max_bytes,
            });
        }
        Ok(())
    }
}

/// Headers with a declared form: text headers consumers parse (`x-value-type`, `content-type`,
/// `tracestate`) must be printable UTF-8, and `traceparent` must be a W3C trace context.
fn validate_header_value(header: &Header) -> Result<(), InvalidMessage> {
    let invalid = |reason: &str| InvalidMessage::InvalidHeaderValue {
        name: header.name.clone(),
        reason: reason.to_owned(),
    };
    let text_headers = [
        headers::VALUE_TYPE,
        "content-type",
        "traceparent",
        "tracestate",
    ];
    if !text_headers.contains(&header.name.as_str()) {
        return Ok(());
    }
    let text = std::str::from_utf8(&header.value).map_err(|_| invalid("not UTF-8 text"))?;
    if text.is_empty() || text.chars().any(char::is_control) {
        return Err(invalid("must be non-empty text without control characters"));
    }
    if header.name == "traceparent" {
        let parts: Vec<&str> = text.split('-').collect();
        let hex = |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        let well_formed = parts.len() == 4
            && hex(parts[0], 2)
            && hex(parts[1], 32)
            && hex(parts[2], 16)
            && hex(parts[3], 2);
        if !well_formed {
            return Err(invalid(
                "not a W3C traceparent (00-<32 hex>-<16 hex>-<2 hex>)",
            ));
        }
    }
    Ok(())
}

/// The longest `x-source` a relay may send; writers reserve room for it in every record.
pub const MAX_SOURCE_BYTES: usize = 255;

/// The headers the relay adds to every record, as (name, value) lengths, the source at its
/// longest.
fn relay_headers() -> [(usize, usize); 2] {
    [
        (headers::SEQUENCE.len(), 8),
        (headers::SOURCE.len(), MAX_SOURCE_BYTES),
    ]
}

/// The size librdkafka checks against the producer's `message.max.bytes` before it accepts a
/// record (`rd_kafka_msg_max_wire_size`): the largest framing of a v2 record (36 bytes: a
/// 5-byte varint each for length, key length, value length, header count and offset delta, a
/// 10-byte timestamp delta, the attributes byte), plus key, value and each header as serialized
/// (zig-zag varint lengths of its name and value, then both).
pub fn record_wire_size(
    key: usize,
    value: usize,
    headers: impl IntoIterator<Item = (usize, usize)>,
) -> usize {
    fn varint(n: usize) -> usize {
        let mut zigzag = (n as u64) << 1;
        let mut bytes = 1;
        while zigzag >= 0x80 {
            zigzag >>= 7;
            bytes += 1;
        }
        bytes
    }
    const MAX_OVERHEAD: usize = 5 + 1 + 10 + 5 + 5 + 5 + 5;
    // Saturating: the lengths are the caller's, and no record is near usize::MAX.
    headers
        .into_iter()
        .map(|(name, value)| {
            (varint(name) + varint(value))
                .saturating_add(name)
                .saturating_add(value)
        })
        .fold(
            MAX_OVERHEAD.saturating_add(key).saturating_add(value),
            usize::saturating_add,
        )
}

/// Kafka's own rules for topic names (`org.apache.kafka.common.internals.Topic`).
pub(crate) fn validate_topic(topic: &str) -> Result<(), InvalidMessage> {
    if topic.is_empty() {
        return Err(InvalidMessage::EmptyTopic);
    }
    if topic.len() > 249 {
        return Err(InvalidMessage::TopicTooLong { len: topic.len() });
    }
    let legal = topic
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if !legal || topic == "." || topic == ".." {
        return Err(InvalidMessage::IllegalTopic {
            topic: topic.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1_000_000;

    #[test]
    fn accepts_legal_topics() {
        for topic in ["things", "thing_topic", "a.b-c_D9", &"x".repeat(249)] {
            assert_eq!(Message::new(topic, vec![]).validate(MAX), Ok(()));
        }
    }

    #[test]
    fn rejects_topics_kafka_would_reject() {
        assert_eq!(validate_topic(""), Err(InvalidMessage::EmptyTopic));
        assert_eq!(
            validate_topic(&"x".repeat(250)),
            Err(InvalidMessage::TopicTooLong { len: 250 })
        );
        for topic in ["with space", "slash/topic", ".", "..", "ümlaut"] {
            assert!(
                matches!(
                    validate_topic(topic),
                    Err(InvalidMessage::IllegalTopic { .. })
                ),
                "{topic:?}"
            );
        }
    }

    /// A public function: lengths near usize::MAX overflowed (a panic in debug builds).
    #[test]
    fn record_wire_size_saturates_instead_of_overflowing() {
        assert_eq!(
            record_wire_size(usize::MAX, 1, [(usize::MAX, usize::MAX)]),
            usize::MAX
        );
    }

    #[test]
    fn rejects_reserved_and_empty_header_names() {
        let reserved = Message::new("t", vec![]).header("x-sequence", vec![1]);
        assert_eq!(
            reserved.validate(MAX),
            Err(InvalidMessage::ReservedHeader {
                name: "x-sequence".into()
            })
        );
        let empty = Message::new("t", vec![]).header("", vec![1]);
        assert_eq!(empty.validate(MAX), Err(InvalidMessage::EmptyHeaderName));
        // PostgreSQL's JSON cannot hold it: it failed the caller's transaction instead.
        let nul = Message::new("t", vec![]).header("a\0b", vec![1]);
        assert_eq!(
            nul.validate(MAX),
            Err(InvalidMessage::NulInHeaderName {
                name: "a\\u{0}b".into()
            })
        );
    }

    #[test]
    fn rejects_header_values_of_the_wrong_form() {
        let cases = [
            ("x-value-type", vec![0xff, 0xfe]),
            ("content-type", b"".to_vec()),
            ("traceparent", b"not-a-trace".to_vec()),
            ("tracestate", b"a=b\n".to_vec()),
        ];
        for (name, value) in cases {
            let message = Message::new("t", vec![]).header(name, value.clone());
            assert!(
                matches!(
                    message.validate(MAX),
                    Err(InvalidMessage::InvalidHeaderValue { .. })
                ),
                "{name} = {value:?}"
            );
        }
        let fine = Message::new("t", vec![])
            .header(
                "traceparent",
                "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
            )
            .header("x-value-type", "ThingCreated")
            .header("anything-else", vec![0xff, 0x00]);
        assert_eq!(fine.validate(MAX), Ok(()));
    }

    #[test]
    fn rejects_messages_over_the_size_limit() {
        let message = Message::new("t", vec![0; 90]).key("0123456789");
        // 36 framing + 10 key + 90 value + x-sequence (1 + 10 + 1 + 8) + x-source at its
        // longest (1 + 8 + 2 + 255).
        let size = 36 + 10 + 90 + 20 + 266;
        assert_eq!(message.validate(size), Ok(()));
        assert_eq!(
            message.header("h", vec![0]).validate(size),
            Err(InvalidMessage::TooLarge {
                size: size + 4,
                max: size
            })
        );
    }
}
