-- Held messages (a failed delivery, waiting for retry_at) by retry time: the claim finds the
-- due ones below its floor through it, and the held keys, instead of walking over every held
-- message in id order (ten thousand held keys once added 10 ms to every claim). Only held rows
-- are in it, so writers do not pay for it.
CREATE INDEX message_due ON {schema}.message (retry_at)
    WHERE processed_at IS NULL AND retry_at IS NOT NULL;
