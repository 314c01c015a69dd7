-- The wake-up trigger fires BEFORE the insert statement instead of after it. An AFTER trigger
-- makes every insert set up and run the after-trigger event queue; with 32 writers committing
-- tiny transactions on two cores that machinery alone (a trigger doing nothing) cost 10-20% of
-- the commit rate, a BEFORE statement trigger ~4% (pgbench, 3 rounds of 8 s). Nothing else
-- changes: a notification is still sent only when the transaction commits, and is discarded
-- with a statement that fails inside a savepoint.
DROP TRIGGER message_notify ON {schema}.message;
CREATE TRIGGER message_notify BEFORE INSERT ON {schema}.message
    FOR EACH STATEMENT EXECUTE FUNCTION {schema}.notify_message();
