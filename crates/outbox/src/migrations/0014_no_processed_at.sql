-- message.processed_at goes. Since migration 0005 the relay moves published messages to
-- `published`, so every row of `message` is pending and the column was NULL in all of them; yet
-- the claim, the backlog and the held-key lookups still filtered on it, so a row that a writer
-- (or a relay built before version 5, still running) marked processed was never published and
-- never counted.

-- Rows marked processed were published by such a relay: they move to `published`, as 0005 moved
-- them, rather than become pending and be published again.
WITH moved AS (
    DELETE FROM {schema}.message WHERE processed_at IS NOT NULL
    RETURNING id, topic, key, payload, headers, created_at, processed_at, attempts)
INSERT INTO {schema}.published (id, topic, key, payload, headers, created_at, processed_at, attempts)
SELECT id, topic, key, payload, headers, created_at, processed_at, attempts FROM moved
ON CONFLICT (id) DO NOTHING;

-- The held messages' indexes named the column in their predicates. They are rebuilt under the
-- same names and over the same rows (every row's processed_at was NULL); each new index exists
-- before the old one is dropped. message_held becomes a hash index on the key: a btree entry
-- holds at most ~2.7 kB, so holding a message with a larger (incompressible) key failed the
-- relay's whole failure record, and it could neither hold that message nor move on; a hash
-- index stores a 4-byte hash whatever the key. The claim looks a key up by equality only.
CREATE INDEX message_held_rebuilt ON {schema}.message USING hash (key) WHERE retry_at IS NOT NULL;
DROP INDEX {schema}.message_held;
ALTER INDEX {schema}.message_held_rebuilt RENAME TO message_held;
CREATE INDEX message_due_rebuilt ON {schema}.message (retry_at) WHERE retry_at IS NOT NULL;
DROP INDEX {schema}.message_due;
ALTER INDEX {schema}.message_due_rebuilt RENAME TO message_due;

ALTER TABLE {schema}.message DROP COLUMN processed_at;

-- Each applied migration's checksum (SHA-256 of its text as embedded in the library, before the
-- schema name is filled in), compared at every migration run, so that a migration edited after
-- it was applied is refused instead of leaving schemas that differ under one version number.
-- The library fills it in for the migrations applied before this one.
ALTER TABLE {schema}.schema_version ADD COLUMN checksum text;
