//! W3C trace context on messages (`otel` feature): the `traceparent` and `tracestate` of the
//! OpenTelemetry context a message is saved in travel with it as Kafka headers, so the relay
//! can record its spans in that trace and the consumer can continue it. An outbox saves them
//! when built with [`crate::Outbox::saving_trace_context`]; [`Message::with_trace_context`] adds
//! them to one message.

use opentelemetry::trace::{SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState};
use opentelemetry::Context;

use crate::message::Message;

/// W3C `traceparent` header.
pub const TRACEPARENT: &str = "traceparent";
/// W3C `tracestate` header.
pub const TRACESTATE: &str = "tracestate";

impl Message {
    /// Adds the `traceparent`/`tracestate` of `context`'s span (if it has a valid one and the
    /// message carries none yet). An outbox [saving trace context](crate::Outbox::saving_trace_context) does
    /// this with the current context; use this when the context is kept elsewhere (e.g. `tracing-opentelemetry`'s
    /// `Span::current().context()`).
    pub fn with_trace_context(mut self, context: &Context) -> Self {
        let span = context.span();
        let span_context = span.span_context();
        if !span_context.is_valid() || self.headers.iter().any(|h| h.name == TRACEPARENT) {
            return self;
        }
        self = self.header(
            TRACEPARENT,
            format!(
                "00-{}-{}-{:02x}",
                span_context.trace_id(),
                span_context.span_id(),
                span_context.trace_flags().to_u8()
            ),
        );
        let state = span_context.trace_state().header();
        if !state.is_empty() {
            self = self.header(TRACESTATE, state);
        }
        self
    }
}

/// The remote span context in a `traceparent` (and `tracestate`) header value, if well-formed.
pub fn parse_trace_context(traceparent: &[u8], tracestate: Option<&[u8]>) -> Option<SpanContext> {
    let text = std::str::from_utf8(traceparent).ok()?;
    let mut parts = text.trim().split('-');
    let (version, trace_id, span_id, flags) =
        (parts.next()?, parts.next()?, parts.next()?, parts.next()?);
    if version != "00" || parts.next().is_some() || trace_id.len() != 32 || span_id.len() != 16 {
        return None;
    }
    let state = tracestate
        .and_then(|s| std::str::from_utf8(s).ok())
        .and_then(|s| s.parse::<TraceState>().ok())
        .unwrap_or_default();
    let context = SpanContext::new(
        TraceId::from_hex(trace_id).ok()?,
        SpanId::from_hex(span_id).ok()?,
        TraceFlags::new(u8::from_str_radix(flags, 16).ok()?),
        true,
        state,
    );
    context.is_valid().then_some(context)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_a_span_context_through_headers() {
        let original = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            false,
            "vendor=value".parse().unwrap(),
        );
        let context = Context::new().with_remote_span_context(original.clone());
        let message = Message::new("t", vec![]).with_trace_context(&context);
        let header = |name: &str| {
            message
                .headers()
                .iter()
                .find(|h| h.name == name)
                .map(|h| h.value.clone())
        };
        let traceparent = header(TRACEPARENT).unwrap();
        assert_eq!(
            traceparent,
            b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        );
        let parsed = parse_trace_context(&traceparent, header(TRACESTATE).as_deref()).unwrap();
        assert_eq!(parsed.trace_id(), original.trace_id());
        assert_eq!(parsed.span_id(), original.span_id());
        assert_eq!(parsed.trace_state().header(), "vendor=value");
    }

    #[test]
    fn no_valid_span_means_no_headers_and_garbage_is_ignored() {
        let message = Message::new("t", vec![]).with_trace_context(&Context::new());
        assert!(message.headers().is_empty());
        assert!(parse_trace_context(b"not a traceparent", None).is_none());
        assert!(parse_trace_context(
            b"00-00000000000000000000000000000000-00f067aa0ba902b7-01",
            None
        )
        .is_none());
    }
}
