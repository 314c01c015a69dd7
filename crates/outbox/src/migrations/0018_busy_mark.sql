-- Writers skip the wake-up trigger's function while the relay is busy.
--
-- The function ran once per INSERT statement to find out, with a query of `relay_lease`, whether
-- a relay waits for a NOTIFY. Once per transaction that query and PL/pgSQL's setup cost ~30 us
-- of a one-message transaction's backend CPU (a third of what the outbox row adds to a plain
-- INSERT, docs/performance.md), and while a relay is busy its answer is always "no".
--
-- The relay holding the lease now keeps a mark, `relay_busy_until` (milliseconds since the
-- epoch, database clock): while busy, a time up to one lease term ahead and never past the end
-- of its term, renewed; 0 before it goes idle and when it hands the lease over. The trigger's
-- WHEN clause reads it without a query and calls the function only when it has passed. The mark
-- only ever saves work: it is set by the lease holder alone (a fenced statement), reset before
-- the relay goes idle (which stays, as before, a committed `relay_lease.idle` that the function
-- checks), and it lapses by itself when the holder's term ends, so a relay that dies, or a
-- successor that does not keep the mark (an older relay), is back to the previous behaviour
-- within a term. A relay whose role may not update it leaves it at 0: writers check every time,
-- as before. Grant UPDATE on it to the relay's role only: a writer that could set it could keep
-- every writer from waking the relay (which would still poll).
--
-- The WHEN clause also takes the transaction id before the statement's rows get their ids (the
-- claim floor needs it, 0007): the CASE evaluates `pg_current_xact_id()` first, whatever the
-- mark says. `clock_timestamp()`, not the statement's or transaction's start: a long one must see
-- a lapsed mark as lapsed.
CREATE SEQUENCE {schema}.relay_busy_until AS bigint MINVALUE 0 START 0;
SELECT setval('{schema}.relay_busy_until', 0, true);
-- Writers read it in the WHEN clause; its value is only a time.
GRANT SELECT ON SEQUENCE {schema}.relay_busy_until TO PUBLIC;

DROP TRIGGER message_notify ON {schema}.message;
CREATE TRIGGER message_notify BEFORE INSERT ON {schema}.message
    FOR EACH STATEMENT
    WHEN (CASE WHEN pg_current_xact_id() IS NULL THEN true
               ELSE coalesce(pg_sequence_last_value('{schema}.relay_busy_until'), 0)
                    <= (extract(epoch FROM clock_timestamp()) * 1000)::bigint END)
    EXECUTE FUNCTION {schema}.notify_message();
