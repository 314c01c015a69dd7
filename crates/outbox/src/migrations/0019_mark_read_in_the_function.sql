-- The insert trigger reads the busy mark in its function, not in a WHEN clause.
--
-- A trigger's WHEN clause is prepared again at every statement (its expression read from the
-- catalog, its functions looked up and their EXECUTE privilege checked), like a table's CHECK:
-- 0018's clause, with eight functions and operators, cost ~10 us per INSERT statement, half of
-- what a one-row INSERT into `message` costs the server in a long transaction (5,000 statements
-- in a PL/pgSQL loop, 4 rounds: 19-21 us with the clause, 11-12 us with the same check at the
-- top of the function, 9-10 us with no trigger at all). The function's expressions are planned
-- once per session; calling it costs ~1-2 us. The behaviour is 0018's: the transaction id first
-- (the claim floor needs it before the statement's rows take their ids, 0007), then nothing to
-- do while the relay holding the lease keeps the mark ahead, or once this transaction notified.
CREATE OR REPLACE FUNCTION {schema}.notify_message() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    transaction_id xid8;
BEGIN
    transaction_id := pg_current_xact_id();
    IF coalesce(pg_sequence_last_value('{schema}.relay_busy_until'), 0)
           > (extract(epoch FROM clock_timestamp()) * 1000)::bigint
       OR current_setting('outbox.notified_{schema}', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF EXISTS (SELECT 1 FROM {schema}.relay_lease WHERE idle AND expires_at > now()) THEN
        PERFORM pg_notify('{channel}', 'message');
        PERFORM set_config('outbox.notified_{schema}', 'on', true);
    END IF;
    RETURN NULL;
END
$$;

DROP TRIGGER message_notify ON {schema}.message;
CREATE TRIGGER message_notify BEFORE INSERT ON {schema}.message
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.notify_message();
