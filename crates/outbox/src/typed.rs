//! Typed messages: encode a value as JSON (`json` feature) or protobuf (`protobuf` feature),
//! with `x-value-type` naming its type and `content-type` its encoding, and decode on the
//! consumer side after checking `x-value-type`.
//!
//! For protobuf, `x-value-type` is the full proto name (`package.Message`), as tomorrow-one's
//! `ProtobufOutboxService` sets it, so its consumers dispatch on it unchanged.

use crate::headers::VALUE_TYPE;
#[cfg(any(feature = "json", feature = "protobuf"))]
use crate::message::Message;

/// The `content-type` header.
pub const CONTENT_TYPE: &str = "content-type";

/// A type published as JSON, with the name consumers dispatch on.
#[cfg(feature = "json")]
pub trait JsonEvent: serde::Serialize + serde::de::DeserializeOwned {
    /// Sent as `x-value-type`, e.g. `"ThingCreated"`.
    const TYPE_NAME: &'static str;
}

/// Why a typed message could not be built or read.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TypedError {
    /// The value could not be serialized.
    #[cfg(feature = "json")]
    #[error("cannot encode {type_name} as JSON: {source}")]
    Encode {
        /// The type.
        type_name: &'static str,
        /// Why.
        #[source]
        source: serde_json::Error,
    },
    /// The record's `x-value-type` names another type (or is absent).
    #[error("expected x-value-type {expected:?}, found {found:?}")]
    WrongType {
        /// The type asked for.
        expected: String,
        /// What the record says.
        found: Option<String>,
    },
    /// The payload is not a valid encoding of the type.
    #[error("malformed {type_name} payload: {reason}")]
    Malformed {
        /// The type.
        type_name: String,
        /// Why.
        reason: String,
    },
}

/// The `x-value-type` of a record's headers, given as (name, value) pairs.
pub fn value_type<'a>(headers: impl IntoIterator<Item = (&'a str, &'a [u8])>) -> Option<&'a str> {
    headers
        .into_iter()
        .find(|(name, _)| *name == VALUE_TYPE)
        .and_then(|(_, value)| std::str::from_utf8(value).ok())
}

#[cfg(any(feature = "json", feature = "protobuf"))]
fn check_type(expected: &str, found: Option<&str>) -> Result<(), TypedError> {
    if found == Some(expected) {
        Ok(())
    } else {
        Err(TypedError::WrongType {
            expected: expected.to_owned(),
            found: found.map(str::to_owned),
        })
    }
}

#[cfg(feature = "json")]
impl Message {
    /// A message carrying `value` as JSON, with `x-value-type: T::TYPE_NAME` and
    /// `content-type: application/json`.
    pub fn json<T: JsonEvent>(topic: impl Into<String>, value: &T) -> Result<Self, TypedError> {
        let payload = serde_json::to_vec(value).map_err(|source| TypedError::Encode {
            type_name: T::TYPE_NAME,
            source,
        })?;
        Ok(Message::new(topic, payload)
            .header(VALUE_TYPE, T::TYPE_NAME)
            .header(CONTENT_TYPE, "application/json"))
    }
}

/// Decodes a JSON payload after checking that `value_type` (the record's `x-value-type`) is
/// `T::TYPE_NAME`.
#[cfg(feature = "json")]
pub fn decode_json<T: JsonEvent>(
    value_type: Option<&str>,
    payload: &[u8],
) -> Result<T, TypedError> {
    check_type(T::TYPE_NAME, value_type)?;
    serde_json::from_slice(payload).map_err(|e| TypedError::Malformed {
        type_name: T::TYPE_NAME.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(feature = "protobuf")]
impl Message {
    /// A message carrying `value` as protobuf, with `x-value-type` set to its full proto name
    /// and `content-type: application/x-protobuf`.
    pub fn protobuf<T: prost::Message + prost::Name>(topic: impl Into<String>, value: &T) -> Self {
        Message::new(topic, value.encode_to_vec())
            .header(VALUE_TYPE, T::full_name())
            .header(CONTENT_TYPE, "application/x-protobuf")
    }
}

/// Decodes a protobuf payload after checking that `value_type` is `T`'s full proto name.
#[cfg(feature = "protobuf")]
pub fn decode_protobuf<T: prost::Message + prost::Name + Default>(
    value_type: Option<&str>,
    payload: &[u8],
) -> Result<T, TypedError> {
    check_type(&T::full_name(), value_type)?;
    T::decode(payload).map_err(|e| TypedError::Malformed {
        type_name: T::full_name(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[cfg(feature = "json")]
    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct ThingCreated {
        id: u64,
        name: String,
    }

    #[cfg(feature = "json")]
    impl JsonEvent for ThingCreated {
        const TYPE_NAME: &'static str = "ThingCreated";
    }

    fn header_pairs(message: &Message) -> Vec<(&str, &[u8])> {
        message
            .headers()
            .iter()
            .map(|h| (h.name.as_str(), h.value.as_slice()))
            .collect()
    }

    #[cfg(feature = "json")]
    #[test]
    fn json_round_trip_checks_the_type() {
        let event = ThingCreated {
            id: 7,
            name: "anvil".into(),
        };
        let message = Message::json("things", &event).unwrap();
        let found = value_type(header_pairs(&message));
        assert_eq!(found, Some("ThingCreated"));
        let decoded: ThingCreated = decode_json(found, message.payload().unwrap()).unwrap();
        assert_eq!(decoded, event);
        assert!(matches!(
            decode_json::<ThingCreated>(Some("ThingDeleted"), b"{}"),
            Err(TypedError::WrongType { .. })
        ));
        assert!(matches!(
            decode_json::<ThingCreated>(Some("ThingCreated"), b"{not json"),
            Err(TypedError::Malformed { .. })
        ));
    }

    #[cfg(feature = "protobuf")]
    #[derive(Clone, PartialEq, prost::Message)]
    struct Ping {
        #[prost(uint64, tag = "1")]
        id: u64,
    }

    #[cfg(feature = "protobuf")]
    impl prost::Name for Ping {
        const NAME: &'static str = "Ping";
        const PACKAGE: &'static str = "demo.v1";
    }

    #[cfg(feature = "protobuf")]
    #[test]
    fn protobuf_uses_the_full_proto_name() {
        let message = Message::protobuf("pings", &Ping { id: 3 });
        let found = value_type(header_pairs(&message));
        assert_eq!(found, Some("demo.v1.Ping"));
        let decoded: Ping = decode_protobuf(found, message.payload().unwrap()).unwrap();
        assert_eq!(decoded, Ping { id: 3 });
    }
}
