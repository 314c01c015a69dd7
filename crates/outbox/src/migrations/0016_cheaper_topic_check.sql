-- The topic check without a counted repetition. `^[a-zA-Z0-9._-]{1,249}$` made PostgreSQL's
-- regex engine build its automaton again at every row: a transaction of 1,000 messages spent
-- 20-28 ms on the check alone, against 3.1-3.3 ms for the whole insert with this one (pgbench,
-- docs/performance.md). The rule is the same: 1 to 249 characters, each of them a letter, a
-- digit, '.', '_' or '-', and not "." or "..".
--
-- 0013 left it unchanged because, with an equivalent pattern, the hostile-writers chaos
-- scenario's healthy messages went from p50 2.6-2.9 to 7.1-8.0 ms. The cause was the relay's
-- claim, not the check: analyzed while its 10,000 held messages were due, the planner walked
-- every id below the claim floor to find due ones (10 ms per claim); the faster inserts only
-- moved autovacuum's ANALYZE to such a moment. The claim now cannot take that plan, and the
-- scenario measures p50 2.3-3.1 ms with this check (2.2-2.4 with the old one).

-- Adding the constraint reads the table once under its exclusive lock, writers and relays
-- waiting (as 0012 and 0014 did): migrate when the backlog is small.
ALTER TABLE {schema}.message
    DROP CONSTRAINT message_topic_is_legal,
    ADD CONSTRAINT message_topic_is_legal CHECK (
        length(topic) BETWEEN 1 AND 249 AND topic !~ '[^a-zA-Z0-9._-]'
        AND topic <> '.' AND topic <> '..'
    );
