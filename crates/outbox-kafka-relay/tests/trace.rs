//! Trace propagation (`otel` feature): one trace from the request that saved a message, through
//! the outbox, to the Kafka record. Its own test binary, since it installs a global tracer.

use std::time::Duration;

use opentelemetry::trace::{Span as _, TraceContextExt, Tracer, TracerProvider as _};
use opentelemetry::{global, Context};
use opentelemetry_sdk::trace::{InMemorySpanExporter, SdkTracerProvider};
use outbox::Message;
use outbox_kafka_relay::{Relay, RelayConfig};
use outbox_test_support::{
    create_topic, kafka_bootstrap_servers, unique_topic, wait_until, TestOutbox, TopicReader,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_trace_runs_from_the_request_through_the_outbox_to_the_kafka_record() {
    let exporter = InMemorySpanExporter::default();
    let provider = SdkTracerProvider::builder()
        .with_simple_exporter(exporter.clone())
        .build();
    global::set_tracer_provider(provider.clone());

    let outbox = TestOutbox::new().await;
    let topic = unique_topic("trace");
    create_topic(&kafka_bootstrap_servers(), &topic, 1).await;
    let mut config = RelayConfig::new(kafka_bootstrap_servers(), "trace-tests");
    config.schema = outbox.schema.clone();
    let relay = Relay::start(outbox.pool.clone(), config).unwrap();

    // The "HTTP request": a span in whose context the business transaction saves the message.
    let request = provider.tracer("things-service").start("POST /things");
    let request_context = request.span_context().clone();
    let cx = Context::current_with_span(request);
    {
        let _attached = cx.clone().attach();
        let mut tx = outbox.pool.begin().await.unwrap();
        // Enabling the feature alone changes nothing an outbox saves: it is opted into.
        outbox
            .outbox
            .save_for_publishing(&mut tx, Message::new(&topic, b"plain".to_vec()).key("k"))
            .await
            .unwrap();
        outbox
            .outbox
            .clone()
            .saving_trace_context()
            .save_for_publishing(&mut tx, Message::new(&topic, b"traced".to_vec()).key("k"))
            .await
            .unwrap();
        tx.commit().await.unwrap();

        // Every client library saves it the same way (see tests/clients.rs).
        let (mut client, connection) =
            tokio_postgres::connect(&outbox_test_support::database_url(), tokio_postgres::NoTls)
                .await
                .unwrap();
        tokio::spawn(connection);
        let tx = client.transaction().await.unwrap();
        outbox
            .outbox
            .clone()
            .saving_trace_context()
            .save_for_publishing(
                &tx,
                Message::new(&topic, b"tokio-postgres".to_vec()).key("k"),
            )
            .await
            .unwrap();
        tx.commit().await.unwrap();
    }
    cx.span().end();

    let mut reader = TopicReader::new(&topic);
    let records = reader.read_at_least(3, Duration::from_secs(60)).await;
    assert_eq!(
        records[2].header("traceparent"),
        records[1].header("traceparent"),
        "tokio-postgres saves the trace context as sqlx does"
    );
    assert_eq!(records[0].payload_str(), "plain");
    assert!(
        records[0].header("traceparent").is_none(),
        "an outbox not saving trace context saved one"
    );
    let record = records[1].clone();
    let traceparent = String::from_utf8(record.header("traceparent").unwrap().to_vec()).unwrap();
    assert_eq!(
        traceparent,
        format!(
            "00-{}-{}-01",
            request_context.trace_id(),
            request_context.span_id()
        ),
        "the consumer receives the request's trace context"
    );

    wait_until(
        Duration::from_secs(10),
        "the relay's spans are exported",
        || async { exporter.get_finished_spans().unwrap().len() >= 3 },
    )
    .await;
    let spans = exporter.get_finished_spans().unwrap();
    for name in ["outbox.wait".to_owned(), format!("kafka.send {topic}")] {
        let span = spans.iter().find(|s| s.name == name).unwrap_or_else(|| {
            panic!(
                "no {name} span among {:?}",
                spans.iter().map(|s| &s.name).collect::<Vec<_>>()
            )
        });
        assert_eq!(
            span.span_context.trace_id(),
            request_context.trace_id(),
            "{name} is in the request's trace"
        );
        assert_eq!(
            span.parent_span_id,
            request_context.span_id(),
            "{name} is a child of the request span"
        );
        assert!(span.start_time <= span.end_time);
    }
    relay.shutdown().await.unwrap();
    outbox.drop_schema().await;
}
