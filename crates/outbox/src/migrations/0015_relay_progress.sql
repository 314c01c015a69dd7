-- Exactly-once delivery (the relay's `delivery = "exactly-once"`): the number of the last batch
-- whose completion committed, per lease. Each batch is one Kafka transaction that records its
-- outbox ids and this number in the progress topic; a holder that starts completes the ids of
-- a progress record newer than this number before it claims, and never those of an older one
-- (republishing puts rows back with their old ids). Written only by the relay, fenced.
CREATE TABLE {schema}.relay_progress (
    lease text   PRIMARY KEY,
    batch bigint NOT NULL
);
