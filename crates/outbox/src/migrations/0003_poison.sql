-- Per-message retry: a message whose delivery failed is held until retry_at, and with it every
-- later message of its key, while other keys keep flowing.
ALTER TABLE {schema}.message ADD COLUMN retry_at timestamptz;
CREATE INDEX message_held ON {schema}.message (topic, key, id)
    WHERE processed_at IS NULL AND retry_at IS NOT NULL;

-- Messages that failed permanently under the dead-letter policy, with their original sequence.
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
