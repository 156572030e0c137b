-- Version 1 to 2: retries, dead letters, the sweep and per-order ordering.
-- A delivery that failed is a dead letter now, with the error class of its last attempt;
-- one still pending was due at once, so the sweep finds it.

ALTER TABLE deliveries
    ADD COLUMN occurred_at timestamptz,
    ADD COLUMN error_class text,
    ADD COLUMN next_attempt_at timestamptz,
    ADD COLUMN claimed_by text,
    ADD COLUMN claimed_at timestamptz,
    ADD COLUMN blocked_by uuid,
    DROP CONSTRAINT deliveries_state_check;

UPDATE deliveries d SET state = 'dead', error_class = (
    SELECT a.error_class FROM attempts a WHERE a.delivery_id = d.id
    ORDER BY a.number DESC LIMIT 1)
WHERE state = 'failed';
UPDATE deliveries SET next_attempt_at = updated_at WHERE state = 'pending';
-- Version 1 kept no time of the event: when the relay took it stands in for it.
UPDATE deliveries SET occurred_at = created_at;

ALTER TABLE deliveries
    ALTER COLUMN occurred_at SET NOT NULL,
    ADD CONSTRAINT deliveries_state_check
        CHECK (state IN ('pending', 'retrying', 'delivered', 'dead', 'skipped'));

CREATE INDEX deliveries_open_due ON deliveries (next_attempt_at)
    WHERE state IN ('pending', 'retrying');
CREATE INDEX deliveries_open_order ON deliveries (affiliate_id, order_number)
    WHERE state IN ('pending', 'retrying');
CREATE INDEX deliveries_blocked_by ON deliveries (blocked_by)
    WHERE blocked_by IS NOT NULL;

ALTER TABLE attempts ADD COLUMN request jsonb;
