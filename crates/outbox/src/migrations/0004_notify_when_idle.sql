-- NOTIFY serializes committing transactions on a global lock: at 32 concurrent writers on two
-- cores it cost 45% of the commit rate. A busy relay claims again by itself and needs no
-- wake-up, so writers notify only while no relay is busy: the relay clears `idle` when it finds
-- work and sets it (then claims once more) before it waits.
ALTER TABLE {schema}.relay_lease ADD COLUMN idle boolean NOT NULL DEFAULT true;

CREATE OR REPLACE FUNCTION {schema}.notify_message() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM {schema}.relay_lease WHERE NOT idle AND expires_at > now()) THEN
        PERFORM pg_notify('{channel}', 'message');
    END IF;
    RETURN NULL;
END
$$;
