-- The inbox: messages a consumer in this database has processed, keyed by their origin.
-- Recording a message and applying its effects in one transaction makes redeliveries no-ops.
CREATE TABLE {schema}.inbox (
    source      text        NOT NULL,
    sequence    bigint      NOT NULL,
    received_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (source, sequence)
);
