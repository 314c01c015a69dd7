-- The claim floor: the relay's claims start at `floor` instead of the lowest id, so they no longer
-- walk over the index entries that completed (deleted) messages leave behind until VACUUM; over a
-- long backlog that walk grew with every batch. Every row below the floor is settled: committed
-- and completed, or rolled back. The relay raises it only past ids that no running transaction can
-- still commit (see `Statements::claim`); statements that put messages back with their old ids
-- (republish, dead-letter retry) lower it in the same transaction; a new lease term starts at 0.
ALTER TABLE {schema}.relay_lease ADD COLUMN floor bigint NOT NULL DEFAULT 0;

-- Makes every transaction that inserts messages take its transaction id before the identity hands
-- out ids (a statement trigger fires before the rows are built), so "all transactions older than
-- X have ended" implies "every id handed out before X was taken is committed or gone". Free when
-- the transaction already wrote something, as a business transaction has.
CREATE FUNCTION {schema}.take_xid() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_current_xact_id();
    RETURN NULL;
END
$$;

CREATE TRIGGER message_xid BEFORE INSERT ON {schema}.message
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.take_xid();
