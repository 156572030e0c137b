-- Version 9 to 10: a worker sends the takes (and the records) of its concurrent jobs as one
-- statement, each of them run as before, in the order they came, in one transaction.

-- A delivery's arrival is when its row is written, not when its transaction began: in a
-- statement for many deliveries, each comes after the ones before it, as they would have one
-- statement each.
ALTER TABLE deliveries ALTER COLUMN created_at SET DEFAULT clock_timestamp();

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
