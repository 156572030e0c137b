-- Version 10 to 11: callbacks that fire only for some order statuses, and callbacks that
-- put their deliveries off for a while after the event was accepted.

ALTER TABLE callbacks
    -- the order statuses it fires for; NULL: every event, whatever its status
    ADD COLUMN statuses text[] CHECK (cardinality(statuses) > 0),
    -- how long after an event was accepted its delivery becomes due
    ADD COLUMN delay_seconds integer NOT NULL DEFAULT 0
        CHECK (delay_seconds BETWEEN 0 AND 86400);

-- postback_take (and postback_take_many) take the time a new delivery is due: two arguments
-- more, with defaults, so workers of version 10 still call them as they did; and say how
-- long until a blocking delivery is due, one column more. The old functions go first:
-- kept, they would make those calls ambiguous.
DROP FUNCTION postback_take_many(
    uuid[], text[], text[], text[], text[], timestamptz[], bigint[], jsonb[], text[], float8[],
    text[], boolean[], float8[], float8[]);
DROP FUNCTION postback_take(
    uuid, text, text, text, text, timestamptz, bigint, jsonb, text, float8, text, boolean,
    float8, float8);

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
