-- Bumped by every statement that lowers the claim floor (republish, dead-letter retry). A rise
-- is a compare-and-set on it rather than on the floor's value: a retry that leaves the value
-- unchanged (the floor was already lower) must still cancel a rise computed concurrently from a
-- snapshot that cannot see the retried rows.
ALTER TABLE {schema}.relay_lease ADD COLUMN floor_generation bigint NOT NULL DEFAULT 0;
