-- Postback relay schema. Idempotent: applying it again changes nothing.
-- Postgres is the record; Redis only carries work to the workers.

CREATE TABLE IF NOT EXISTS callbacks (
    id            bigserial PRIMARY KEY,
    affiliate_id  text        NOT NULL CHECK (length(affiliate_id) BETWEEN 1 AND 64),
    event_type    text        NOT NULL CHECK (event_type IN ('order.created', 'order.updated')),
    method        text        NOT NULL CHECK (method IN ('GET', 'POST')),
    url_template  text        NOT NULL,
    secret        text,
    enabled       boolean     NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (affiliate_id, event_type)
);

-- One row per (event, callback key): the id is derived from the event id, affiliate and
-- event type, so a repeated event id never creates a second delivery, and the receiver sees
-- the same Idempotency-Key on every try.
--
-- States: pending (not tried yet), retrying (tried, another try is due at next_attempt_at),
-- delivered, dead (dead-lettered: a permanent failure or the schedule ran out), skipped (no
-- enabled callback when the event came), discarded (a dead letter ops chose to drop, with a
-- note in actions). Only pending and retrying change again, and a replay reopens a dead or
-- discarded one.
CREATE TABLE IF NOT EXISTS deliveries (
    id              uuid        PRIMARY KEY,
    event_id        text        NOT NULL,
    event_type      text        NOT NULL,
    affiliate_id    text        NOT NULL,
    order_number    text        NOT NULL,
    occurred_at     timestamptz NOT NULL,  -- orders the updates of one order
    callback_id     bigint,     -- no foreign key: the record outlives a removed callback
    event           jsonb       NOT NULL,
    state           text        NOT NULL,
    reason          text,       -- why it is retrying, dead or skipped
    error_class     text,       -- of the last failed attempt, for filtering dead letters
    request         jsonb,      -- the last rendered request: method, url, headers, body
    attempts        integer     NOT NULL DEFAULT 0,  -- kept here so listings need no count
    next_attempt_at timestamptz,  -- when pending or retrying: when the next try is due
    claimed_by      text,       -- the job sending it right now, if any
    claimed_at      timestamptz,
    blocked_by      uuid,       -- an earlier delivery of the same order it waits for
    retry_base      integer     NOT NULL DEFAULT 0,  -- attempts before the last replay: the
                                                     -- retry schedule starts again after it
    resend          boolean     NOT NULL DEFAULT false,  -- the last replay asked for `request`
                                                         -- as it was, not a fresh rendering
    created_at      timestamptz NOT NULL DEFAULT now(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT deliveries_state_check
        CHECK (state IN ('pending', 'retrying', 'delivered', 'dead', 'skipped', 'discarded'))
);

-- A database made before retries existed: add what is missing, and call its failures dead.
-- Checked first, because ALTER TABLE locks the table out even when it has nothing to do,
-- and this file runs against live databases.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'deliveries'
                   AND column_name = 'next_attempt_at') THEN
        ALTER TABLE deliveries
            ADD COLUMN IF NOT EXISTS occurred_at timestamptz,
            ADD COLUMN IF NOT EXISTS error_class text,
            ADD COLUMN IF NOT EXISTS next_attempt_at timestamptz,
            ADD COLUMN IF NOT EXISTS claimed_by text,
            ADD COLUMN IF NOT EXISTS claimed_at timestamptz,
            ADD COLUMN IF NOT EXISTS blocked_by uuid;
    END IF;
    IF EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'deliveries'::regclass
               AND conname = 'deliveries_state_check'
               AND pg_get_constraintdef(oid) NOT LIKE '%retrying%') THEN
        ALTER TABLE deliveries DROP CONSTRAINT deliveries_state_check;
        UPDATE deliveries d SET state = 'dead', error_class = (
            SELECT a.error_class FROM attempts a WHERE a.delivery_id = d.id
            ORDER BY a.number DESC LIMIT 1)
        WHERE state = 'failed';
        -- Open deliveries of the old version were due at once; the sweep finds them now.
        UPDATE deliveries SET next_attempt_at = updated_at
        WHERE state = 'pending' AND next_attempt_at IS NULL;
        ALTER TABLE deliveries ADD CONSTRAINT deliveries_state_check
            CHECK (state IN ('pending', 'retrying', 'delivered', 'dead', 'skipped', 'discarded'));
    END IF;
    IF EXISTS (SELECT FROM information_schema.columns
               WHERE table_schema = current_schema() AND table_name = 'deliveries'
               AND column_name = 'occurred_at' AND is_nullable = 'YES') THEN
        UPDATE deliveries SET occurred_at = created_at WHERE occurred_at IS NULL;
        ALTER TABLE deliveries ALTER COLUMN occurred_at SET NOT NULL;
    END IF;
END $$;

-- A database made before replays existed (issue 3's schema).
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'deliveries'
                   AND column_name = 'retry_base') THEN
        ALTER TABLE deliveries
            ADD COLUMN IF NOT EXISTS retry_base integer NOT NULL DEFAULT 0,
            ADD COLUMN IF NOT EXISTS resend boolean NOT NULL DEFAULT false;
    END IF;
    IF EXISTS (SELECT FROM pg_constraint WHERE conrelid = 'deliveries'::regclass
               AND conname = 'deliveries_state_check'
               AND pg_get_constraintdef(oid) NOT LIKE '%discarded%') THEN
        ALTER TABLE deliveries DROP CONSTRAINT deliveries_state_check;
        ALTER TABLE deliveries ADD CONSTRAINT deliveries_state_check
            CHECK (state IN ('pending', 'retrying', 'delivered', 'dead', 'skipped', 'discarded'));
    END IF;
END $$;

CREATE INDEX IF NOT EXISTS deliveries_affiliate_created ON deliveries (affiliate_id, created_at);
CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries (order_number);
-- Listings page newest first, on (created_at, id).
CREATE INDEX IF NOT EXISTS deliveries_created ON deliveries (created_at, id);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries (state) WHERE state <> 'delivered';
-- What the sweep and the per-order ordering look at: the few deliveries still open.
CREATE INDEX IF NOT EXISTS deliveries_open_due ON deliveries (next_attempt_at)
    WHERE state IN ('pending', 'retrying');
CREATE INDEX IF NOT EXISTS deliveries_open_order ON deliveries (affiliate_id, order_number)
    WHERE state IN ('pending', 'retrying');
CREATE INDEX IF NOT EXISTS deliveries_blocked_by ON deliveries (blocked_by)
    WHERE blocked_by IS NOT NULL;

CREATE TABLE IF NOT EXISTS attempts (
    id               bigserial   PRIMARY KEY,
    delivery_id      uuid        NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    number           integer     NOT NULL,
    started_at       timestamptz NOT NULL,
    duration_ms      double precision NOT NULL,
    status_code      integer,
    error_class      text,
    error            text,
    response_excerpt text,
    request          jsonb,      -- what this attempt sent (each is signed afresh)
    UNIQUE (delivery_id, number)
);

DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM information_schema.columns
                   WHERE table_schema = current_schema() AND table_name = 'attempts'
                   AND column_name = 'request') THEN
        ALTER TABLE attempts ADD COLUMN request jsonb;
    END IF;
END $$;

-- What ops did to a delivery, and who: replays (from which attempt on) and discards (with
-- the note that says why). Kept forever, like the attempts.
CREATE TABLE IF NOT EXISTS actions (
    id          bigserial   PRIMARY KEY,
    delivery_id uuid        NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    action      text        NOT NULL CHECK (action IN ('replay', 'discard')),
    mode        text        CHECK (mode IN ('rerender', 'resend')),  -- of a replay
    actor       text        NOT NULL,
    note        text,
    attempt     integer     NOT NULL,  -- replay: the number of its first attempt;
                                       -- discard: the attempts made before it
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS actions_delivery ON actions (delivery_id, id);

-- Test fires: a callback sent a sample or given event on request, outside any delivery.
CREATE TABLE IF NOT EXISTS test_fires (
    id               bigserial   PRIMARY KEY,
    callback_id      bigint,     -- no foreign key: the record outlives a removed callback
    affiliate_id     text        NOT NULL,
    event_type       text        NOT NULL,
    actor            text        NOT NULL,
    fired_at         timestamptz NOT NULL DEFAULT now(),
    request          jsonb       NOT NULL,
    duration_ms      double precision NOT NULL,
    status_code      integer,
    error_class      text,
    error            text,
    response_headers jsonb,
    response_excerpt text
);

-- Workers cache callbacks and drop the cache when told, so every change to the table, by
-- any path (CLI, API, a 410 disabling one, SQL by hand), tells them, once it commits.
CREATE OR REPLACE FUNCTION postback_callbacks_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('postback_callbacks', '');
    RETURN NULL;
END
$$;
DROP TRIGGER IF EXISTS callbacks_changed ON callbacks;
CREATE TRIGGER callbacks_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON callbacks
    FOR EACH STATEMENT EXECUTE FUNCTION postback_callbacks_changed();
