-- Version 6 to 7: an update that reaches the relay before its order's create waits for it
-- (`p_create_wait`, the action `awaiting`), then goes anyway with an `order_note`. Workers
-- of version 6 call postback_take with 13 arguments: the new one takes them too, its 14th
-- has a default, and so they never wait.

ALTER TABLE deliveries
    ADD COLUMN create_wait_until timestamptz,
    ADD COLUMN order_note text;

DROP FUNCTION postback_take(
    uuid, text, text, text, text, timestamptz, bigint, jsonb, text, float8, text, boolean, float8);

CREATE FUNCTION postback_take(
    p_id uuid, p_event_id text, p_event_type text, p_affiliate_id text, p_order_number text,
    p_occurred_at timestamptz, p_callback_id bigint, p_event jsonb, p_job text,
    p_claim_timeout float8, p_close_reason text, p_close_dead boolean, p_defer float8,
    p_create_wait float8 DEFAULT NULL,
    OUT action text, OUT inserted boolean, OUT event jsonb, OUT state text,
    OUT attempts integer, OUT wait float8, OUT claimed_by text, OUT blocked_by uuid,
    OUT retry_base integer, OUT resend jsonb, OUT blocker_id uuid, OUT blocker_event_id text,
    OUT woken text[], OUT gave_up_waiting boolean)
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
                            occurred_at, callback_id, event, state, next_attempt_at)
    VALUES (p_id, p_event_id, p_event_type, p_affiliate_id, p_order_number,
            p_occurred_at, p_callback_id, p_event, 'pending', now())
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
        SELECT p.id, p.event_id INTO blocker_id, blocker_event_id
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
                IF wait_until > now() THEN
                    UPDATE deliveries SET blocked_by = NULL, create_wait_until = wait_until
                    WHERE id = p_id;
                    wait := extract(epoch FROM wait_until - now())::float8;
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

-- A delivery that settles or is put off no longer waits for its create either.
CREATE OR REPLACE FUNCTION postback_record(
    p_id uuid, p_affiliate_id text, p_order_number text, p_callback_id bigint,
    p_state text, p_reason text, p_failure_class text, p_delay float8, p_request jsonb,
    p_started_at timestamptz, p_duration_ms float8, p_status_code integer,
    p_error_class text, p_error text, p_excerpt text, p_disable_callback boolean)
RETURNS text[] LANGUAGE plpgsql AS $$
DECLARE
    n integer;
BEGIN
    IF p_state <> 'retrying' THEN
        PERFORM postback_lock_order(p_affiliate_id, p_order_number);
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
                          error_class, error, response_excerpt, request)
    VALUES (p_id, n, p_started_at, p_duration_ms, p_status_code,
            p_error_class, p_error, p_excerpt, p_request);
    IF p_disable_callback THEN
        UPDATE callbacks SET enabled = false, updated_at = now() WHERE id = p_callback_id;
    END IF;
    IF p_state = 'retrying' THEN
        RETURN '{}';
    END IF;
    RETURN postback_waiting_for(p_id);
END
$$;
