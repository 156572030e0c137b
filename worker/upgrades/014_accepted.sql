-- Version 13 to 14: an event accepted by ingest (or a durable producer) is in the ledger
-- before the order system hears "accepted": a delivery in the new state `accepted`, which the
-- sweep queues again if Redis loses its job and which a worker's take makes `pending`.

ALTER TABLE deliveries
    DROP CONSTRAINT deliveries_state_check,
    ADD CONSTRAINT deliveries_state_check
        CHECK (state IN ('accepted', 'pending', 'retrying', 'delivered', 'dead', 'skipped',
                         'discarded'));

-- The sweep finds accepted deliveries due without a job, and an order's ordering sees them,
-- through the indexes of the open deliveries. The check above and these indexes each read
-- the table once while deliveries wait, as step 12's indexes did.
DROP INDEX deliveries_open_due;
CREATE INDEX deliveries_open_due ON deliveries (next_attempt_at)
    WHERE state IN ('accepted', 'pending', 'retrying');
DROP INDEX deliveries_open_order;
CREATE INDEX deliveries_open_order ON deliveries (affiliate_id, order_number)
    WHERE state IN ('accepted', 'pending', 'retrying');

-- Events recorded before they are queued (ingest, a durable producer), one statement for a
-- batch: element k of each array is the k-th event, with the delivery id its worker will
-- derive. Each becomes a delivery `accepted` and due now, with no callback yet; an id the
-- ledger has already changes nothing. Returns the ids recorded by this call. The rows are
-- written in the order of their ids, so two batches with ids in common lock them in one
-- order and never wait for each other in a circle; their arrival (created_at) is still
-- the batch's order, a microsecond apart.
CREATE FUNCTION postback_accept(
    p_id uuid[], p_event_id text[], p_event_type text[], p_affiliate_id text[],
    p_order_number text[], p_occurred_at timestamptz[], p_event jsonb[])
RETURNS SETOF uuid LANGUAGE sql AS $$
    INSERT INTO deliveries (id, event_id, event_type, affiliate_id, order_number,
                            occurred_at, event, state, next_attempt_at, created_at)
    SELECT t.id, t.event_id, t.event_type, t.affiliate_id, t.order_number, t.occurred_at,
           t.event, 'accepted', now(), s.at + make_interval(secs => (t.k - 1) / 1e6)
    FROM unnest(p_id, p_event_id, p_event_type, p_affiliate_id, p_order_number,
                p_occurred_at, p_event) WITH ORDINALITY
             AS t(id, event_id, event_type, affiliate_id, order_number, occurred_at, event, k),
         (SELECT clock_timestamp() AS at) AS s
    ORDER BY t.id
    ON CONFLICT (id) DO NOTHING
    RETURNING id
$$;

-- postback_take keeps its arguments and results, so workers of version 13 call it as they
-- did: replaced in place.
-- A job's first step, under the order's lock: create the delivery `pending` and due now, or
-- find it (the first recording wins: a repeated event id never changes what is sent), then
-- decide. A delivery found `accepted` is made `pending` as if this call had created it.
-- `action` says what was done:
--   settled    it is final already (a repeated event): nothing to do;
--   early      its next try is not due yet (the job was run early);
--   elsewhere  another job claimed it less than `p_claim_timeout` seconds ago;
--   closed     `p_close_reason` was given: settled `skipped` if never tried (or `dead` if
--              tried, or if `p_close_dead`), with `woken` the deliveries that waited for it;
--   blocked    an earlier open delivery of the same order goes first, one accepted and not
--              taken yet included (after Redis lost its jobs the sweep queues them in no
--              order of theirs): `blocker_*` (with `blocker_wait`, the seconds until that
--              one is due), and `blocked_by` is the one it waited for before this call;
--   awaiting   `p_create_wait` was given (an update whose affiliate has an order.created
--              callback) and the ledger has no create of its order yet: it waits until
--              `p_create_wait` seconds after the first of its order's deliveries reached
--              the relay (accepted, or taken if not recorded before) (`create_wait_until`; `wait` is the seconds left). A create that arrives meanwhile makes it wait for that
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
CREATE OR REPLACE FUNCTION postback_take(
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
    fresh boolean;
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
    fresh := inserted;
    IF NOT inserted THEN
        -- A concurrent insert of the same row made the INSERT wait for it; this finds it.
        SELECT * INTO STRICT d FROM deliveries WHERE id = p_id FOR UPDATE;
        IF d.state = 'accepted' THEN
            -- Recorded when it was accepted, taken now: it becomes the delivery the insert
            -- would have made, keeping its arrival (created_at, which orders it) and the
            -- event as first recorded. `inserted` says that event is the caller's, as for
            -- an insert; when it is not, the caller sends the recorded one.
            UPDATE deliveries
            SET state = 'pending', callback_id = p_callback_id,
                next_attempt_at = greatest(now(), p_due_at),
                reason = CASE WHEN p_due_at > now() THEN p_due_reason END, updated_at = now()
            WHERE id = p_id
            RETURNING * INTO d;
            inserted := d.event = p_event;
            fresh := true;
        END IF;
    END IF;
    IF fresh AND p_event_type = 'order.created' THEN
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
          AND p.state IN ('accepted', 'pending', 'retrying')
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
            -- The wait is counted from the first of the order's deliveries to reach the
            -- relay, so a later update does not make the order wait all over again.
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
