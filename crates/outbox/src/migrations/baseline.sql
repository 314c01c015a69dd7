-- The schema of migrations 0001 to 0020 in one script: a new schema is created by this file alone
-- and recorded at version 20, while schemas made by earlier versions apply the migrations after
-- theirs. The why of each object is in the migration that made it what it is (named below).
-- The test `the_baseline_builds_the_schema_the_migrations_build` keeps the two paths equal:
-- a new migration changes this file too, or runs after it.

-- Kafka's topic name rules (0001), enforced here too for writers that bypass the library: a
-- domain, whose check is planned once per session, not at every statement as a table CHECK is
-- (0017); no counted repetition in the pattern, which would cost 20 us per row (0016).
CREATE DOMAIN {schema}.topic_name AS text
    CONSTRAINT message_topic_is_legal CHECK (
        length(VALUE) BETWEEN 1 AND 249 AND VALUE !~ '[^a-zA-Z0-9._-]'
        AND VALUE <> '.' AND VALUE <> '..'
    );

-- The outbox table (0001): one row per message, written in the service's own transaction. Every
-- row is pending: the relay moves published messages to `published` (0005, 0014).
CREATE TABLE {schema}.message (
    -- The sequence (x-sequence). CACHE 1 keeps ids in nextval order across sessions, which the
    -- relay's per-key ordering argument and the claim floor rely on (0001, 0013).
    id           bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    topic        {schema}.topic_name NOT NULL,
    key          bytea,
    payload      bytea,
    -- User headers, in order: [{"name": n, "text": v} | {"name": n, "base64": v}, ...]
    headers      jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text,
    -- A message whose delivery failed is held until retry_at, and with it every later message
    -- of its key (0003).
    retry_at     timestamptz
);

-- Held messages by key (0003) and by retry time (0012, 0014).
CREATE INDEX message_held ON {schema}.message USING hash (key) WHERE retry_at IS NOT NULL;
CREATE INDEX message_due ON {schema}.message (retry_at) WHERE retry_at IS NOT NULL;

-- Small, hot, update-heavy table: vacuum it eagerly.
ALTER TABLE {schema}.message SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02);

-- One row per lease (0001): who may publish, until when (database clock), and the fencing token
-- that every fenced statement checks; whether its holder waits for a wake-up (0004, 0006); the
-- claim floor and its generation (0008, 0009).
CREATE TABLE {schema}.relay_lease (
    name             text PRIMARY KEY,
    holder           text        NOT NULL,
    token            bigint      NOT NULL,
    acquired_at      timestamptz NOT NULL,
    renewed_at       timestamptz NOT NULL,
    expires_at       timestamptz NOT NULL,
    idle             boolean     NOT NULL DEFAULT true,
    floor            bigint      NOT NULL DEFAULT 0,
    floor_generation bigint      NOT NULL DEFAULT 0
);

-- Exactly-once delivery's last completed batch per lease (0015).
CREATE TABLE {schema}.relay_progress (
    lease text   PRIMARY KEY,
    batch bigint NOT NULL
);

-- The inbox (0002): messages a consumer in this database has processed, keyed by their origin.
CREATE TABLE {schema}.inbox (
    source      text        NOT NULL,
    sequence    bigint      NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, sequence)
);

-- Messages that failed permanently under the dead-letter policy, with their original sequence
-- (0003).
CREATE TABLE {schema}.dead_letter (
    id         bigint PRIMARY KEY,
    topic      text        NOT NULL,
    key        bytea,
    payload    bytea,
    headers    jsonb,
    created_at timestamptz NOT NULL,
    dead_at    timestamptz NOT NULL DEFAULT now(),
    attempts   integer     NOT NULL,
    error      text        NOT NULL
);

-- Published messages (0005), append-only, kept for the retention.
CREATE TABLE {schema}.published (
    id           bigint PRIMARY KEY,
    topic        text        NOT NULL,
    key          bytea,
    payload      bytea,
    headers      jsonb,
    created_at   timestamptz NOT NULL,
    processed_at timestamptz NOT NULL,
    attempts     integer     NOT NULL
);
-- Retention cleanup and "last publish" read this one.
CREATE INDEX published_processed ON {schema}.published (processed_at);

-- While the relay holding the lease is busy it keeps `relay_busy_until` ahead of the clock
-- (milliseconds since the epoch) and writers have no one to wake (0018).
CREATE SEQUENCE {schema}.relay_busy_until AS bigint MINVALUE 0 START 0;
SELECT setval('{schema}.relay_busy_until', 0, true);
GRANT SELECT ON SEQUENCE {schema}.relay_busy_until TO PUBLIC;

-- The insert trigger (0007, 0010, 0013, 0018, 0019, 0020): takes the transaction id before the
-- identity hands out ids (the claim floor needs it) and wakes a waiting relay, once per
-- transaction, unless the busy mark is ahead. The mark is read here, not in a WHEN clause, which
-- would be prepared again at every statement (0019). PostgreSQL's functions are named with their
-- schema, whatever the writer's search_path (0020).
CREATE FUNCTION {schema}.notify_message() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    transaction_id xid8;
BEGIN
    transaction_id := pg_catalog.pg_current_xact_id();
    IF coalesce(pg_catalog.pg_sequence_last_value('{schema}.relay_busy_until'), 0)
           > (extract(epoch FROM pg_catalog.clock_timestamp()) * 1000)::bigint
       OR pg_catalog.current_setting('outbox.notified_{schema}', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM {schema}.relay_lease WHERE idle AND expires_at > pg_catalog.now()) THEN
        PERFORM pg_catalog.pg_notify('{channel}', 'message');
        PERFORM pg_catalog.set_config('outbox.notified_{schema}', 'on', true);
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER message_notify BEFORE INSERT ON {schema}.message
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.notify_message();

-- Enqueueing from SQL (0001, 0011, 0013): the header rules, one message, many messages.
CREATE FUNCTION {schema}.stored_headers(headers jsonb, caller text) RETURNS jsonb
LANGUAGE plpgsql STRICT AS $$
DECLARE
    bad record;
BEGIN
    IF jsonb_typeof(stored_headers.headers) <> 'object' THEN
        RAISE EXCEPTION '%: headers must be a JSON object of text values, not %',
            caller, jsonb_typeof(stored_headers.headers) USING ERRCODE = 'invalid_parameter_value';
    END IF;
    FOR bad IN SELECT h.key AS name, jsonb_typeof(h.value) AS type
                 FROM jsonb_each(stored_headers.headers) AS h
                WHERE h.key = '' OR h.key IN ('x-sequence', 'x-source')
                   OR jsonb_typeof(h.value) <> 'string'
    LOOP
        IF bad.name = '' THEN
            RAISE EXCEPTION '%: a header name is empty', caller
                USING ERRCODE = 'invalid_parameter_value';
        ELSIF bad.name IN ('x-sequence', 'x-source') THEN
            RAISE EXCEPTION '%: header "%" is reserved: the relay sets it', caller, bad.name
                USING ERRCODE = 'invalid_parameter_value';
        ELSE
            RAISE EXCEPTION '%: header "%" must be a JSON string, not %', caller, bad.name, bad.type
                USING ERRCODE = 'invalid_parameter_value';
        END IF;
    END LOOP;
    RETURN (SELECT jsonb_agg(jsonb_build_object('name', h.key, 'text', h.value))
              FROM jsonb_each_text(stored_headers.headers) AS h);
END
$$;

CREATE FUNCTION {schema}.enqueue(topic text, key text, payload bytea, headers jsonb DEFAULT NULL)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    sequence bigint;
BEGIN
    INSERT INTO {schema}.message (topic, key, payload, headers)
    VALUES (enqueue.topic, convert_to(enqueue.key, 'UTF8'), enqueue.payload,
            {schema}.stored_headers(enqueue.headers, 'outbox.enqueue'))
    RETURNING id INTO sequence;
    RETURN sequence;
END
$$;

CREATE FUNCTION {schema}.enqueue_all(topics text[], keys text[], payloads bytea[], headers jsonb[] DEFAULT NULL)
RETURNS SETOF bigint LANGUAGE plpgsql AS $$
BEGIN
    IF topics IS NULL OR payloads IS NULL THEN
        RAISE EXCEPTION 'outbox.enqueue_all: topics and payloads must not be NULL (a NULL element is allowed)'
            USING ERRCODE = 'null_value_not_allowed';
    END IF;
    IF cardinality(payloads) <> cardinality(topics) OR cardinality(keys) <> cardinality(topics)
       OR cardinality(enqueue_all.headers) <> cardinality(topics) THEN
        RAISE EXCEPTION 'outbox.enqueue_all: the arrays differ in length (topics %, keys %, payloads %, headers %)',
            cardinality(topics), cardinality(keys), cardinality(payloads), cardinality(enqueue_all.headers)
            USING ERRCODE = 'array_subscript_error';
    END IF;
    IF cardinality(topics) = 0 THEN
        RETURN;
    END IF;
    -- Ids are handed out in the insert's order, ORDER BY n, so ascending ids are input order.
    -- The CASE spares messages without headers the error prefix.
    RETURN QUERY
    WITH inserted AS (
        INSERT INTO {schema}.message (topic, key, payload, headers)
        SELECT m.topic, convert_to(m.key, 'UTF8'), m.payload,
               CASE WHEN m.headers IS NOT NULL
                    THEN {schema}.stored_headers(m.headers, 'outbox.enqueue_all: message ' || m.n) END
          FROM unnest(topics, keys, payloads, enqueue_all.headers)
               WITH ORDINALITY AS m(topic, key, payload, headers, n)
         ORDER BY m.n
        RETURNING id)
    SELECT id FROM inserted ORDER BY id;
END
$$;

-- The migrations' checksums (0014).
ALTER TABLE {schema}.schema_version ADD COLUMN checksum text;
