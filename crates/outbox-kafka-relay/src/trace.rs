//! OpenTelemetry spans for traced messages (`otel` feature): for each published message that
//! carries a `traceparent`, an `outbox.wait` span (from its insert until the relay claimed it)
//! and a `kafka.send` span (from the claim until Kafka's acknowledgement), both children of the
//! span that saved the message, so they appear in the same trace as the request that caused it.

use std::time::{Duration, SystemTime};

use crate::postgres::PendingMessage;
use opentelemetry::global;
use opentelemetry::trace::{Span, SpanKind, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use outbox::trace::{parse_trace_context, TRACEPARENT, TRACESTATE};

/// Records the spans of one delivered message; `since_claim` is the time from claim to ack.
pub(crate) fn record(message: &PendingMessage, since_claim: Duration) {
    let header = |name: &str| {
        message
            .headers
            .iter()
            .find(|h| h.name == name)
            .map(|h| h.value.as_slice())
    };
    let Some(parent) =
        header(TRACEPARENT).and_then(|tp| parse_trace_context(tp, header(TRACESTATE)))
    else {
        return;
    };
    let parent = Context::new().with_remote_span_context(parent);
    let acked = SystemTime::now();
    let claimed = acked - since_claim;
    let inserted = claimed - message.age;
    let tracer = global::tracer("outbox-relay");
    let attributes = || {
        vec![
            KeyValue::new("messaging.system", "kafka"),
            KeyValue::new("messaging.destination.name", message.topic.clone()),
            KeyValue::new("outbox.sequence", message.id),
        ]
    };
    let mut wait = tracer
        .span_builder("outbox.wait")
        .with_kind(SpanKind::Internal)
        .with_start_time(inserted)
        .with_attributes(attributes())
        .start_with_context(&tracer, &parent);
    wait.end_with_timestamp(claimed);
    let mut send = tracer
        .span_builder(format!("kafka.send {}", message.topic))
        .with_kind(SpanKind::Producer)
        .with_start_time(claimed)
        .with_attributes(attributes())
        .start_with_context(&tracer, &parent);
    send.end_with_timestamp(acked);
}
