-- Postback relay schema: what `postback db init` makes of an empty database.
-- A database made by an earlier version is brought to this one by the numbered steps in
-- worker/upgrades/ instead, each from one version to the next; a test checks that both
-- ways end in the same tables, columns, constraints, indexes, functions and triggers.
-- Postgres is the record; Redis only carries work to the workers.

-- The version, in a table of one row, so `postback db init` knows which steps a database
-- still needs: read and written in the transaction that changes the schema, and by
-- anyone with access to the tables (a comment on the database would need its owner).
CREATE TABLE schema_version (
    version integer NOT NULL,
    one_row boolean PRIMARY KEY DEFAULT true CHECK (one_row)  -- so never a second row
);
INSERT INTO schema_version (version) VALUES (13);  -- the number of the last upgrade step

CREATE TABLE callbacks (
    id            bigserial PRIMARY KEY,
    affiliate_id  text        NOT NULL CHECK (length(affiliate_id) BETWEEN 1 AND 64),
    event_type    text        NOT NULL CHECK (event_type IN ('order.created', 'order.updated')),
    method        text        NOT NULL CHECK (method IN ('GET', 'POST')),
    url_template  text        NOT NULL,
    secret        text,
    enabled       boolean     NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    -- the order statuses it fires for; NULL: every event, whatever its status
    statuses      text[]      CHECK (cardinality(statuses) > 0),
    -- how long after an event was accepted its delivery becomes due
    delay_seconds integer     NOT NULL DEFAULT 0 CHECK (delay_seconds BETWEEN 0 AND 86400),
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
CREATE TABLE deliveries (
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
    create_wait_until timestamptz,  -- an update waiting for its order's create, which the
                                    -- ledger has not seen yet: it goes anyway at this time
    order_note      text,       -- set when it went out of order: sent without its create
    retry_base      integer     NOT NULL DEFAULT 0,  -- attempts before the last replay: the
                                                     -- retry schedule starts again after it
    resend          boolean     NOT NULL DEFAULT false,  -- the last replay asked for `request`
                                                         -- as it was, not a fresh rendering
    -- its arrival: when the row was written, not when its transaction began, so that in a
    -- statement for many deliveries (postback_take_many) each comes after the ones before it
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    updated_at      timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT deliveries_state_check
        CHECK (state IN ('pending', 'retrying', 'delivered', 'dead', 'skipped', 'discarded'))
);

CREATE INDEX deliveries_affiliate_created ON deliveries (affiliate_id, created_at);
CREATE INDEX deliveries_order ON deliveries (order_number);
-- Listings page newest first, on (created_at, id). The filters that match few rows have an
-- index in that order, so a page is read from where it starts rather than found by sorting
-- every match, or by reading the whole ledger for a value that matches none.
CREATE INDEX deliveries_created ON deliveries (created_at, id);
-- The states other than delivered, which ops list, bulk replay selects and the gauges count.
CREATE INDEX deliveries_state ON deliveries (state, created_at, id) WHERE state <> 'delivered';
-- The error class is set on the few deliveries that failed (dead, discarded, retrying).
CREATE INDEX deliveries_error_class ON deliveries (error_class, created_at, id)
    WHERE error_class IS NOT NULL;
-- What the sweep and the per-order ordering look at: the few deliveries still open.
CREATE INDEX deliveries_open_due ON deliveries (next_attempt_at)
    WHERE state IN ('pending', 'retrying');
CREATE INDEX deliveries_open_order ON deliveries (affiliate_id, order_number)
    WHERE state IN ('pending', 'retrying');
CREATE INDEX deliveries_blocked_by ON deliveries (blocked_by)
    WHERE blocked_by IS NOT NULL;

CREATE TABLE attempts (
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
    response_headers jsonb,      -- what came back with the excerpt; NULL without an answer
    UNIQUE (delivery_id, number)
);

-- What ops did to a delivery, and who: replays (from which attempt on) and discards (with
-- the note that says why), kept as long as their delivery (worker/prune.py); and what ops or
-- the relay did to a callback (disable, enable) or to an affiliate's records (erase), which
-- name those rather than a delivery: an erase outlives the deliveries it removed.
CREATE TABLE actions (
    id          bigserial   PRIMARY KEY,
    delivery_id uuid        REFERENCES deliveries (id) ON DELETE CASCADE,
    action      text        NOT NULL,
    mode        text        CHECK (mode IN ('rerender', 'resend')),  -- of a replay
    actor       text        NOT NULL,
    note        text,
    attempt     integer,    -- replay: the number of its first attempt;
                            -- discard: the attempts made before it
    at          timestamptz NOT NULL DEFAULT now(),
    affiliate_id text,
    event_type   text,
    callback_id  bigint,
    detail       jsonb,      -- what an erase removed, the streak that disabled a callback
    CONSTRAINT actions_action_check
        CHECK (action IN ('replay', 'discard', 'disable', 'enable', 'erase')),
    CONSTRAINT actions_subject CHECK (
        CASE WHEN action IN ('replay', 'discard')
             THEN delivery_id IS NOT NULL AND attempt IS NOT NULL
             ELSE delivery_id IS NULL AND affiliate_id IS NOT NULL END)
);
CREATE INDEX actions_delivery ON actions (delivery_id, id);
CREATE INDEX actions_affiliate ON actions (affiliate_id, id) WHERE delivery_id IS NULL;

-- Test fires: a callback sent a sample or given event on request, outside any delivery.
CREATE TABLE test_fires (
    id               bigserial   PRIMARY KEY,
    callback_id      bigint,     -- no foreign key: the record outlives a removed callback
    affiliate_id     text        NOT NULL,  -- whose event it sent (a store-wide callback's
                                            -- sample is sample-affiliate's)
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

-- A callback's deliveries that died in a row since the last one delivered. A row exists only
-- while its callback is failing, so a healthy callback's deliveries only look here.
CREATE TABLE callback_health (
    callback_id   bigint      PRIMARY KEY REFERENCES callbacks (id) ON DELETE CASCADE,
    dead_streak   integer     NOT NULL CHECK (dead_streak > 0),
    first_dead_at timestamptz NOT NULL,
    last_dead_at  timestamptz NOT NULL
);

-- What the relay tells ops (POSTBACK_OPS_WEBHOOK): at most one an hour per cause (a callback
-- disabled, an affiliate's dead letters, a destination's open circuit), each kept with how
-- its sending went. `unsent`: no webhook was set when it was due.
CREATE TABLE notifications (
    id              bigserial   PRIMARY KEY,
    cause           text        NOT NULL,
    kind            text        NOT NULL
        CHECK (kind IN ('callback_disabled', 'dead_letters', 'circuit_open')),
    text            text        NOT NULL,  -- what a person reads (Slack shows this field)
    fields          jsonb       NOT NULL,  -- the same, for machines
    created_at      timestamptz NOT NULL DEFAULT now(),
    state           text        NOT NULL DEFAULT 'pending'
        CHECK (state IN ('pending', 'sent', 'failed', 'unsent')),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz DEFAULT now(),  -- while pending
    status_code     integer,    -- of the last try
    error           text,       -- of the last try that failed
    sent_at         timestamptz
);
CREATE INDEX notifications_cause ON notifications (cause, created_at);
CREATE INDEX notifications_created ON notifications (created_at, id);
CREATE INDEX notifications_due ON notifications (next_attempt_at) WHERE state = 'pending';

-- A notification for `p_cause`, unless one was written for it in the last hour; its id, or
-- NULL when it was held back. Two writers of one cause take turns on a lock of their own.
CREATE FUNCTION postback_notify(p_cause text, p_kind text, p_text text, p_fields jsonb)
RETURNS bigint LANGUAGE plpgsql AS $$
DECLARE
    n bigint;
BEGIN
    -- The two-key form: a key space apart from the orders' locks.
    PERFORM pg_advisory_xact_lock(hashtext('postback_notify'), hashtext(p_cause));
    IF EXISTS (SELECT 1 FROM notifications
               WHERE cause = p_cause AND created_at > now() - interval '1 hour') THEN
        RETURN NULL;
    END IF;
    INSERT INTO notifications (cause, kind, text, fields)
    VALUES (p_cause, p_kind, p_text, p_fields)
    RETURNING id INTO n;
    RETURN n;
END
$$;

-- Disable a callback that is enabled, recorded in actions as `p_actor`'s doing because of
-- `p_note`, and, when `p_notify`, notified (ops who disable one themselves need no message).
-- False when it was not enabled (or is gone): nothing is written then.
CREATE FUNCTION postback_disable_callback(
    p_callback_id bigint, p_actor text, p_note text, p_detail jsonb, p_notify boolean)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    a text;
    e text;
BEGIN
    UPDATE callbacks SET enabled = false, updated_at = now()
    WHERE id = p_callback_id AND enabled
    RETURNING affiliate_id, event_type INTO a, e;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    INSERT INTO actions (action, actor, note, affiliate_id, event_type, callback_id, detail)
    VALUES ('disable', p_actor, p_note, a, e, p_callback_id, p_detail);
    IF p_notify THEN
        PERFORM postback_notify(
            'callback_disabled:' || p_callback_id, 'callback_disabled',
            format('Postback callback %s %s was disabled by %s: %s', a, e, p_actor, p_note),
            jsonb_build_object('affiliate_id', a, 'event_type', e, 'callback_id', p_callback_id,
                               'actor', p_actor, 'reason', p_note)
            || coalesce(p_detail, '{}'));
    END IF;
    RETURN true;
END
$$;

-- Enable a callback that is disabled, recorded in actions; its streak of dead deliveries
-- starts again from nothing. False when it was not disabled (or is gone).
CREATE FUNCTION postback_enable_callback(p_callback_id bigint, p_actor text, p_note text)
RETURNS boolean LANGUAGE plpgsql AS $$
DECLARE
    a text;
    e text;
BEGIN
    UPDATE callbacks SET enabled = true, updated_at = now()
    WHERE id = p_callback_id AND NOT enabled
    RETURNING affiliate_id, event_type INTO a, e;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    DELETE FROM callback_health WHERE callback_id = p_callback_id;
    INSERT INTO actions (action, actor, note, affiliate_id, event_type, callback_id)
    VALUES ('enable', p_actor, p_note, a, e, p_callback_id);
    RETURN true;
END
$$;

-- What settled deliveries do to their callbacks' streaks: one that was delivered ends its
-- callback's streak, one that died adds to it. A streak of `p_disable_after` or more whose
-- first death is at least `p_disable_span` seconds old disables the callback, as the relay's
-- doing, notified (NULL `p_disable_after`: never). Callbacks go in the order of their ids, so
-- two transactions lock their rows in one order; a callback with a death must be locked
-- (FOR UPDATE) before this, as the callbacks a 410 disables are.
CREATE FUNCTION postback_callback_outcomes(
    p_callback_id bigint[], p_state text[], p_reason text[],
    p_disable_after integer, p_disable_span float8)
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    o record;
    h callback_health;
BEGIN
    FOR o IN
        -- Per callback: whether any delivered, and the deaths after its last delivered one,
        -- with the reason of its last death.
        SELECT t.c,
               bool_or(t.s = 'delivered') AS delivered,
               count(*) FILTER (WHERE t.s = 'dead' AND t.k > t.last_delivered) AS deaths,
               (array_agg(t.r ORDER BY t.k DESC) FILTER (WHERE t.s = 'dead'))[1] AS reason
        FROM (SELECT u.c, u.s, u.r, u.k,
                     coalesce(max(u.k) FILTER (WHERE u.s = 'delivered')
                              OVER (PARTITION BY u.c), 0) AS last_delivered
              FROM unnest(p_callback_id, p_state, p_reason) WITH ORDINALITY AS u(c, s, r, k)
              WHERE u.c IS NOT NULL AND u.s IN ('delivered', 'dead')) AS t
        GROUP BY t.c
        ORDER BY t.c
    LOOP
        IF o.delivered THEN
            DELETE FROM callback_health WHERE callback_id = o.c;
        END IF;
        CONTINUE WHEN o.deaths = 0;
        INSERT INTO callback_health AS ch (callback_id, dead_streak, first_dead_at, last_dead_at)
        SELECT o.c, o.deaths, now(), now()
        WHERE EXISTS (SELECT 1 FROM callbacks WHERE id = o.c)  -- a removed one has no streak
        ON CONFLICT (callback_id) DO UPDATE
        SET dead_streak = ch.dead_streak + excluded.dead_streak, last_dead_at = now()
        RETURNING * INTO h;
        IF FOUND AND h.dead_streak >= p_disable_after
           AND h.first_dead_at <= now() - make_interval(secs => p_disable_span) THEN
            PERFORM postback_disable_callback(
                o.c, 'relay',
                format('%s deliveries in a row died since %s; the last: %s', h.dead_streak,
                       to_char(h.first_dead_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS "UTC"'),
                       o.reason),
                jsonb_build_object('dead_streak', h.dead_streak,
                                   'first_dead_at', h.first_dead_at,
                                   'last_dead_at', h.last_dead_at),
                true);
        END IF;
    END LOOP;
END
$$;

-- Workers cache callbacks and drop the cache when told, so every change to the table, by
-- any path (CLI, API, a 410 disabling one, SQL by hand), tells them, once it commits.
CREATE FUNCTION postback_callbacks_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('postback_callbacks', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER callbacks_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON callbacks
    FOR EACH STATEMENT EXECUTE FUNCTION postback_callbacks_changed();

-- What a worker does to the ledger for each event: one statement each way, so a delivery
-- costs two round trips to Postgres and no explicit transaction. A worker's concurrent jobs
-- share them: the takes (and the records) that come while one is in flight go together in
-- the next, through postback_take_many (and postback_record_many), at the end of this file.

-- The key of an order's lock, one home for the text both lock functions hash.
CREATE FUNCTION postback_order_key(p_affiliate_id text, p_order_number text)
RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtextextended(p_affiliate_id || E'\n' || p_order_number, 0)
$$;

-- Serialises, until commit, the transactions that order one affiliate's order: a delivery
-- either sees an earlier one that is open, or that one sees it waiting when it settles and
-- wakes it; never neither.
CREATE FUNCTION postback_lock_order(p_affiliate_id text, p_order_number text)
RETURNS void LANGUAGE sql AS $$
    SELECT pg_advisory_xact_lock(postback_order_key(p_affiliate_id, p_order_number))
$$;

-- The locks of many orders, in the order of their keys. A transaction that holds several
-- order locks takes them all first, this way, and the callbacks it disables after them (by
-- id) before it writes a row: two such transactions wait for each other in one order only,
-- so never in a circle, and Postgres never has a deadlock to break.
CREATE FUNCTION postback_lock_orders(p_affiliate_id text[], p_order_number text[])
RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    k bigint;
BEGIN
    FOR k IN
        SELECT DISTINCT postback_order_key(a, o)
        FROM unnest(p_affiliate_id, p_order_number) AS t(a, o)
        ORDER BY 1
    LOOP
        PERFORM pg_advisory_xact_lock(k);
    END LOOP;
END
$$;

-- The event ids of the open deliveries waiting for this one: the jobs to wake when it settles.
CREATE FUNCTION postback_waiting_for(p_id uuid)
RETURNS text[] LANGUAGE sql STABLE AS $$
    SELECT coalesce(array_agg(event_id), '{}') FROM deliveries
    WHERE blocked_by = p_id AND state IN ('pending', 'retrying')
$$;

-- A job's first step, under the order's lock: create the delivery `pending` and due now, or
-- find it (the first recording wins: a repeated event id never changes what is sent), then
-- decide. `action` says what was done:
--   settled    it is final already (a repeated event): nothing to do;
--   early      its next try is not due yet (the job was run early);
--   elsewhere  another job claimed it less than `p_claim_timeout` seconds ago;
--   closed     `p_close_reason` was given: settled `skipped` if never tried (or `dead` if
--              tried, or if `p_close_dead`), with `woken` the deliveries that waited for it;
--   blocked    an earlier open delivery of the same order goes first: `blocker_*` (with
--              `blocker_wait`, the seconds until that one is due), and `blocked_by` is
--              the one it waited for before this call;
--   awaiting   `p_create_wait` was given (an update whose affiliate has an order.created
--              callback) and the ledger has no create of its order yet: it waits until
--              `p_create_wait` seconds after the first of its order's deliveries was taken
--              (`create_wait_until`; `wait` is the seconds left). A create that arrives meanwhile makes it wait for that
--              create instead (`blocked_by`), which wakes it when it settles;
--   deferred   it could go, but `p_defer` was given (its destination is busy or down):
--              due again in `p_defer` seconds, waiting for no earlier delivery;
--   claimed    claimed for `p_job`: send it.
-- A delivery created with `p_due_at` later than now (its callback's delay) is due then, with
-- `p_due_reason` as its reason until it is tried: `early` until that time.
-- `gave_up_waiting` is true when this call let an update go without its create because the
-- wait was over (said once: `order_note` records it on the delivery).
-- Creates go before updates, then by occurred_at, then by arrival.
-- Workers from before `p_create_wait` call it with 13 arguments, and so never wait; those
-- from before `p_due_at` with 14, and so never delay.
CREATE FUNCTION postback_take(
    p_id uuid, p_event_id text, p_event_type text, p_affiliate_id text, p_order_number text,
    p_occurred_at timestamptz, p_callback_id bigint, p_event jsonb, p_job text,
    p_claim_timeout float8, p_close_reason text, p_close_dead boolean, p_defer float8,
    p_create_wait float8 DEFAULT NULL, p_due_at timestamptz DEFAULT NULL,
    p_due_reason text DEFAULT NULL,
    OUT action text, OUT inserted boolean, OUT event jsonb, OUT state text,
    OUT attempts integer, OUT wait float8, OUT claimed_by text, OUT blocked_by uuid,
    OUT retry_base integer, OUT resend jsonb, OUT blocker_id uuid, OUT blocker_event_id text,
    OUT woken text[], OUT gave_up_waiting boolean, OUT blocker_wait float8)
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    d deliveries;
    has_create boolean;
    first_taken timestamptz;
    wait_until timestamptz;
BEGIN
    PERFORM postback_lock_order(p_affiliate_id, p_order_number);
    INSERT INTO deliveries (id, event_id, event_type, affiliate_id, order_number,
                            occurred_at, callback_id, event, state, next_attempt_at, reason)
    VALUES (p_id, p_event_id, p_event_type, p_affiliate_id, p_order_number,
            p_occurred_at, p_callback_id, p_event, 'pending', greatest(now(), p_due_at),
            CASE WHEN p_due_at > now() THEN p_due_reason END)
    ON CONFLICT (id) DO NOTHING
    RETURNING * INTO d;
    inserted := FOUND;
    IF NOT inserted THEN
        -- A concurrent insert of the same row made the INSERT wait for it; this finds it.
        SELECT * INTO STRICT d FROM deliveries WHERE id = p_id FOR UPDATE;
    ELSIF p_event_type = 'order.created' THEN
        -- The create that updates of its order were waiting for: now they wait for it, and
        -- it wakes them when it settles.
        UPDATE deliveries u SET blocked_by = p_id, create_wait_until = NULL
        WHERE u.affiliate_id = p_affiliate_id AND u.order_number = p_order_number
          AND u.state IN ('pending', 'retrying') AND u.create_wait_until IS NOT NULL;
    END IF;
    event := d.event;
    state := d.state;
    attempts := d.attempts;
    claimed_by := d.claimed_by;
    blocked_by := d.blocked_by;
    retry_base := d.retry_base;
    resend := CASE WHEN d.resend THEN d.request END;
    wait := coalesce(extract(epoch FROM d.next_attempt_at - now())::float8, 0);
    woken := '{}';
    gave_up_waiting := false;

    IF d.state NOT IN ('pending', 'retrying') THEN
        action := 'settled';
    ELSIF wait > 0 THEN
        action := 'early';
    ELSIF d.claimed_by <> p_job
          AND d.claimed_at > now() - make_interval(secs => p_claim_timeout) THEN
        action := 'elsewhere';
    ELSIF p_close_reason IS NOT NULL THEN
        state := CASE WHEN p_close_dead OR d.attempts > 0 THEN 'dead' ELSE 'skipped' END;
        UPDATE deliveries
        SET state = postback_take.state, reason = p_close_reason, next_attempt_at = NULL,
            claimed_by = NULL, claimed_at = NULL, blocked_by = NULL, create_wait_until = NULL,
            updated_at = now()
        WHERE id = p_id;
        woken := postback_waiting_for(p_id);
        action := 'closed';
    ELSE
        SELECT p.id, p.event_id, extract(epoch FROM p.next_attempt_at - now())::float8
        INTO blocker_id, blocker_event_id, blocker_wait
        FROM deliveries p
        WHERE p.affiliate_id = d.affiliate_id AND p.order_number = d.order_number
          AND p.state IN ('pending', 'retrying')
          AND p.id <> d.id
          AND ((p.event_type <> 'order.created')::int, p.occurred_at, p.created_at, p.id)
            < ((d.event_type <> 'order.created')::int, d.occurred_at, d.created_at, d.id)
        ORDER BY (p.event_type <> 'order.created')::int, p.occurred_at, p.created_at, p.id
        LIMIT 1;
        IF FOUND THEN
            UPDATE deliveries SET blocked_by = blocker_id, create_wait_until = NULL
            WHERE id = p_id;
            action := 'blocked';
            RETURN;
        END IF;
        IF p_create_wait IS NOT NULL AND d.event_type = 'order.updated'
           AND d.order_note IS NULL THEN
            -- The wait is counted from the first of the order's deliveries the relay took,
            -- so a later update does not make the order wait all over again.
            SELECT bool_or(c.event_type = 'order.created'), min(c.created_at)
            INTO has_create, first_taken
            FROM deliveries c
            WHERE c.affiliate_id = d.affiliate_id AND c.order_number = d.order_number;
            IF NOT has_create THEN
                wait_until := first_taken + make_interval(secs => p_create_wait);
                -- The clock, not the transaction's start: the order's first delivery may
                -- be this one, written a moment ago (created_at is the row's own time).
                IF wait_until > clock_timestamp() THEN
                    UPDATE deliveries SET blocked_by = NULL, create_wait_until = wait_until
                    WHERE id = p_id;
                    wait := extract(epoch FROM wait_until - clock_timestamp())::float8;
                    action := 'awaiting';
                    RETURN;
                END IF;
                UPDATE deliveries
                SET create_wait_until = NULL,
                    order_note = format(
                        'sent without its order.created: none had come %s s after the '
                        'order''s first update reached the relay',
                        trim_scale(round(p_create_wait::numeric, 3)))
                WHERE id = p_id;
                gave_up_waiting := true;
            END IF;
        END IF;
        IF p_defer IS NOT NULL THEN
            UPDATE deliveries
            SET blocked_by = NULL, create_wait_until = NULL,
                next_attempt_at = now() + make_interval(secs => p_defer), updated_at = now()
            WHERE id = p_id;
            action := 'deferred';
        ELSE
            UPDATE deliveries
            SET claimed_by = p_job, claimed_at = now(), blocked_by = NULL,
                create_wait_until = NULL
            WHERE id = p_id;
            action := 'claimed';
        END IF;
    END IF;
END
$$;

-- An attempt and what follows from it, at once: the delivery's new state, the attempt's
-- row, for a 410 the callback disabled (a delivery that starts after this commits is
-- skipped; one already sending still finishes), and the callback's streak of dead
-- deliveries, which may disable it too (`postback_callback_outcomes`). Returns
-- `postback_waiting_for` when the delivery settles, under the order's lock; nothing when it
-- is to be retried. `p_outcomes` false leaves the streak to the caller: postback_record_many
-- counts its whole batch's at the end.
-- Workers from before `p_response_headers` call it with 16 arguments, recording none; those
-- from before `p_disable_after` with 17, and so never disable a callback on their own.
CREATE FUNCTION postback_record(
    p_id uuid, p_affiliate_id text, p_order_number text, p_callback_id bigint,
    p_state text, p_reason text, p_failure_class text, p_delay float8, p_request jsonb,
    p_started_at timestamptz, p_duration_ms float8, p_status_code integer,
    p_error_class text, p_error text, p_excerpt text, p_disable_callback boolean,
    p_response_headers jsonb DEFAULT NULL, p_disable_after integer DEFAULT NULL,
    p_disable_span float8 DEFAULT NULL, p_outcomes boolean DEFAULT true)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    IF p_state <> 'retrying' THEN
        PERFORM postback_lock_order(p_affiliate_id, p_order_number);
    END IF;
    IF p_outcomes AND (p_disable_callback OR p_state = 'dead') THEN
        PERFORM 1 FROM callbacks WHERE id = p_callback_id FOR UPDATE;
    END IF;
    UPDATE deliveries
    SET attempts = attempts + 1, state = p_state, reason = p_reason,
        error_class = p_failure_class, request = p_request, callback_id = p_callback_id,
        next_attempt_at = now() + make_interval(secs => p_delay),
        claimed_by = NULL, claimed_at = NULL, blocked_by = NULL, create_wait_until = NULL,
        updated_at = now()
    WHERE id = p_id
    RETURNING attempts INTO STRICT n;
    INSERT INTO attempts (delivery_id, number, started_at, duration_ms, status_code,
                          error_class, error, response_excerpt, request, response_headers)
    VALUES (p_id, n, p_started_at, p_duration_ms, p_status_code,
            p_error_class, p_error, p_excerpt, p_request, p_response_headers);
    IF p_disable_callback THEN
        PERFORM postback_disable_callback(
            p_callback_id, 'relay', p_reason, jsonb_build_object('status_code', p_status_code),
            true);
    END IF;
    IF p_outcomes THEN
        PERFORM postback_callback_outcomes(
            ARRAY[p_callback_id], ARRAY[p_state], ARRAY[p_reason], p_disable_after,
            p_disable_span);
    END IF;
    IF p_state = 'retrying' THEN
        RETURN '{}';
    END IF;
    RETURN postback_waiting_for(p_id);
END
$$;

-- `postback_take` for many deliveries: element k of each array is the k-th call's argument,
-- and the k-th call's row comes back numbered k. The calls run in that order, exactly as
-- separate statements would, except that they commit together.
CREATE FUNCTION postback_take_many(
    p_id uuid[], p_event_id text[], p_event_type text[], p_affiliate_id text[],
    p_order_number text[], p_occurred_at timestamptz[], p_callback_id bigint[],
    p_event jsonb[], p_job text[], p_claim_timeout float8[], p_close_reason text[],
    p_close_dead boolean[], p_defer float8[], p_create_wait float8[],
    p_due_at timestamptz[] DEFAULT NULL, p_due_reason text[] DEFAULT NULL)
RETURNS TABLE (
    i integer, action text, inserted boolean, event jsonb, state text, attempts integer,
    wait float8, claimed_by text, blocked_by uuid, retry_base integer, resend jsonb,
    blocker_id uuid, blocker_event_id text, woken text[], gave_up_waiting boolean,
    blocker_wait float8)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM postback_lock_orders(p_affiliate_id, p_order_number);
    FOR k IN 1 .. cardinality(p_id) LOOP
        RETURN QUERY SELECT k, t.* FROM postback_take(
            p_id[k], p_event_id[k], p_event_type[k], p_affiliate_id[k], p_order_number[k],
            p_occurred_at[k], p_callback_id[k], p_event[k], p_job[k], p_claim_timeout[k],
            p_close_reason[k], p_close_dead[k], p_defer[k], p_create_wait[k], p_due_at[k],
            p_due_reason[k]) AS t;
    END LOOP;
END
$$;

-- `postback_record` for many attempts, likewise: the k-th call's `woken` comes back
-- numbered k. The callbacks that a 410 disables and those with a death are locked first, in
-- the order of their ids; their streaks are counted after every attempt is written.
CREATE FUNCTION postback_record_many(
    p_id uuid[], p_affiliate_id text[], p_order_number text[], p_callback_id bigint[],
    p_state text[], p_reason text[], p_failure_class text[], p_delay float8[],
    p_request jsonb[], p_started_at timestamptz[], p_duration_ms float8[],
    p_status_code integer[], p_error_class text[], p_error text[], p_excerpt text[],
    p_disable_callback boolean[], p_response_headers jsonb[],
    p_disable_after integer DEFAULT NULL, p_disable_span float8 DEFAULT NULL)
RETURNS TABLE (i integer, woken text[])
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM postback_lock_orders(p_affiliate_id, p_order_number);
    PERFORM 1 FROM callbacks c
    WHERE c.id IN (SELECT t.c FROM unnest(p_callback_id, p_disable_callback, p_state)
                                   AS t(c, d, s)
                   WHERE t.d OR t.s = 'dead')
    ORDER BY c.id
    FOR UPDATE OF c;
    FOR k IN 1 .. cardinality(p_id) LOOP
        RETURN QUERY SELECT k, postback_record(
            p_id[k], p_affiliate_id[k], p_order_number[k], p_callback_id[k], p_state[k],
            p_reason[k], p_failure_class[k], p_delay[k], p_request[k], p_started_at[k],
            p_duration_ms[k], p_status_code[k], p_error_class[k], p_error[k], p_excerpt[k],
            p_disable_callback[k], p_response_headers[k], p_disable_after, p_disable_span,
            false);
    END LOOP;
    PERFORM postback_callback_outcomes(
        p_callback_id, p_state, p_reason, p_disable_after, p_disable_span);
END
$$;
