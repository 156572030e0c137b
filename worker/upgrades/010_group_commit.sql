-- Version 9 to 10: a worker sends the takes (and the records) of its concurrent jobs as one
-- statement, each of them run as before, in the order they came, in one transaction.

-- A delivery's arrival is when its row is written, not when its transaction began: in a
-- statement for many deliveries, each comes after the ones before it, as they would have one
-- statement each.
ALTER TABLE deliveries ALTER COLUMN created_at SET DEFAULT clock_timestamp();

-- postback_take compares an update's wait for its create with the clock rather than the
-- transaction's start, since the order's first delivery may be the row it just wrote.
CREATE OR REPLACE FUNCTION postback_take(
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

-- The key of an order's lock, one home for the text both lock functions hash.
CREATE FUNCTION postback_order_key(p_affiliate_id text, p_order_number text)
RETURNS bigint LANGUAGE sql IMMUTABLE AS $$
    SELECT hashtextextended(p_affiliate_id || E'\n' || p_order_number, 0)
$$;

CREATE OR REPLACE FUNCTION postback_lock_order(p_affiliate_id text, p_order_number text)
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

-- `postback_take` for many deliveries: element k of each array is the k-th call's argument,
-- and the k-th call's row comes back numbered k. The calls run in that order, exactly as
-- separate statements would, except that they commit together.
CREATE FUNCTION postback_take_many(
    p_id uuid[], p_event_id text[], p_event_type text[], p_affiliate_id text[],
    p_order_number text[], p_occurred_at timestamptz[], p_callback_id bigint[],
    p_event jsonb[], p_job text[], p_claim_timeout float8[], p_close_reason text[],
    p_close_dead boolean[], p_defer float8[], p_create_wait float8[])
RETURNS TABLE (
    i integer, action text, inserted boolean, event jsonb, state text, attempts integer,
    wait float8, claimed_by text, blocked_by uuid, retry_base integer, resend jsonb,
    blocker_id uuid, blocker_event_id text, woken text[], gave_up_waiting boolean)
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM postback_lock_orders(p_affiliate_id, p_order_number);
    FOR k IN 1 .. cardinality(p_id) LOOP
        RETURN QUERY SELECT k, t.* FROM postback_take(
            p_id[k], p_event_id[k], p_event_type[k], p_affiliate_id[k], p_order_number[k],
            p_occurred_at[k], p_callback_id[k], p_event[k], p_job[k], p_claim_timeout[k],
            p_close_reason[k], p_close_dead[k], p_defer[k], p_create_wait[k]) AS t;
    END LOOP;
END
$$;

-- `postback_record` for many attempts, likewise: the k-th call's `woken` comes back
-- numbered k.
CREATE FUNCTION postback_record_many(
    p_id uuid[], p_affiliate_id text[], p_order_number text[], p_callback_id bigint[],
    p_state text[], p_reason text[], p_failure_class text[], p_delay float8[],
    p_request jsonb[], p_started_at timestamptz[], p_duration_ms float8[],
    p_status_code integer[], p_error_class text[], p_error text[], p_excerpt text[],
    p_disable_callback boolean[], p_response_headers jsonb[])
RETURNS TABLE (i integer, woken text[])
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM postback_lock_orders(p_affiliate_id, p_order_number);
    PERFORM 1 FROM callbacks c
    WHERE c.id IN (SELECT t.c FROM unnest(p_callback_id, p_disable_callback) AS t(c, d)
                   WHERE t.d)
    ORDER BY c.id
    FOR UPDATE OF c;
    FOR k IN 1 .. cardinality(p_id) LOOP
        RETURN QUERY SELECT k, postback_record(
            p_id[k], p_affiliate_id[k], p_order_number[k], p_callback_id[k], p_state[k],
            p_reason[k], p_failure_class[k], p_delay[k], p_request[k], p_started_at[k],
            p_duration_ms[k], p_status_code[k], p_error_class[k], p_error[k], p_excerpt[k],
            p_disable_callback[k], p_response_headers[k]);
    END LOOP;
END
$$;
