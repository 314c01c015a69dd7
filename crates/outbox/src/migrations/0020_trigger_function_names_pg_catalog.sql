-- The insert trigger's function names PostgreSQL's functions with their schema.
--
-- Unqualified, they are looked up on the writer's `search_path`: a writer that may create
-- functions in a schema it puts before pg_catalog could have its own `pg_current_xact_id()`
-- called, and insert without holding a transaction id before its rows take their ids, which
-- the claim floor relies on (0007); its messages could then fall below the floor and wait for
-- the next lease term, out of order with other writers' messages of their keys. (0018's WHEN
-- clause stored resolved functions; 0019 moved the calls into the body.) The operators are left
-- as they are: they only decide whether this writer's own transaction wakes the relay.
CREATE OR REPLACE FUNCTION {schema}.notify_message() RETURNS trigger LANGUAGE plpgsql AS $$
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
