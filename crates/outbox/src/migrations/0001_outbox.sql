-- The outbox table: one row per message, written in the service's own transaction.
CREATE TABLE {schema}.message (
    -- The sequence (x-sequence). CACHE 1 keeps ids in nextval order across sessions, which the
    -- relay's per-key ordering argument relies on (see outbox-relay's docs).
    id           bigint GENERATED ALWAYS AS IDENTITY (CACHE 1) PRIMARY KEY,
    topic        text        NOT NULL,
    key          bytea,
    payload      bytea,
    -- User headers, in order: [{"name": n, "text": v} | {"name": n, "base64": v}, ...]
    headers      jsonb,
    created_at   timestamptz NOT NULL DEFAULT now(),
    processed_at timestamptz,
    attempts     integer     NOT NULL DEFAULT 0,
    last_error   text,
    -- Kafka's topic name rules, enforced here too for writers that bypass the library.
    CONSTRAINT message_topic_is_legal CHECK (
        topic ~ '^[a-zA-Z0-9._-]{1,249}$' AND topic <> '.' AND topic <> '..'
    )
);

-- The relay claims pending messages in id order; this partial index keeps that an index scan
-- however many processed rows the table holds.
CREATE INDEX message_pending ON {schema}.message (id) WHERE processed_at IS NULL;
-- Retention cleanup finds old processed rows through this one.
CREATE INDEX message_processed ON {schema}.message (processed_at) WHERE processed_at IS NOT NULL;

-- Small, hot, update-heavy table: vacuum it eagerly.
ALTER TABLE {schema}.message SET (autovacuum_vacuum_scale_factor = 0.01, autovacuum_analyze_scale_factor = 0.02);

-- One row per lease: who may publish, until when (database clock), and the fencing token that
-- every fenced statement checks.
CREATE TABLE {schema}.relay_lease (
    name        text PRIMARY KEY,
    holder      text        NOT NULL,
    token       bigint      NOT NULL,
    acquired_at timestamptz NOT NULL,
    renewed_at  timestamptz NOT NULL,
    expires_at  timestamptz NOT NULL
);

-- Wakes the relay when a transaction that inserted messages commits (NOTIFY is delivered at
-- commit, never for a rolled-back transaction). Once per statement, and PostgreSQL folds
-- identical notifications of one transaction into one.
CREATE FUNCTION {schema}.notify_message() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('{channel}', 'message');
    RETURN NULL;
END
$$;

CREATE TRIGGER message_notify AFTER INSERT ON {schema}.message
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.notify_message();

-- Enqueue from any language, inside the caller's transaction:
--   SELECT outbox.enqueue('thing_topic', 'thing-42', '{"id":42}'::bytea, '{"x-value-type":"ThingCreated"}');
-- Header values are text (stored as their UTF-8 bytes). Returns the sequence (x-sequence).
CREATE FUNCTION {schema}.enqueue(topic text, key text, payload bytea, headers jsonb DEFAULT NULL)
RETURNS bigint LANGUAGE sql AS $$
    INSERT INTO {schema}.message (topic, key, payload, headers)
    VALUES (
        topic,
        convert_to(key, 'UTF8'),
        payload,
        (SELECT jsonb_agg(jsonb_build_object('name', h.key, 'text', h.value))
           FROM jsonb_each_text(headers) AS h)
    )
    RETURNING id
$$;
