-- Version 8 to 9: an attempt records the headers of the answer it got, beside its excerpt,
-- so `postback deliveries show` can print what came back. Attempts made before have none.

ALTER TABLE attempts ADD COLUMN response_headers jsonb;

-- postback_record gains p_response_headers, last and optional: a worker of version 8 still
-- calls it with 16 arguments during a rolling upgrade. Dropped first, since a second
-- function beside the old one would make such a call ambiguous.
DROP FUNCTION postback_record(
    uuid, text, text, bigint, text, text, text, float8, jsonb, timestamptz, float8, integer,
    text, text, text, boolean);

CREATE FUNCTION postback_record(
    p_id uuid, p_affiliate_id text, p_order_number text, p_callback_id bigint,
    p_state text, p_reason text, p_failure_class text, p_delay float8, p_request jsonb,
    p_started_at timestamptz, p_duration_ms float8, p_status_code integer,
    p_error_class text, p_error text, p_excerpt text, p_disable_callback boolean,
    p_response_headers jsonb DEFAULT NULL)
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
                          error_class, error, response_excerpt, request, response_headers)
    VALUES (p_id, n, p_started_at, p_duration_ms, p_status_code,
            p_error_class, p_error, p_excerpt, p_request, p_response_headers);
    IF p_disable_callback THEN
        UPDATE callbacks SET enabled = false, updated_at = now() WHERE id = p_callback_id;
    END IF;
    IF p_state = 'retrying' THEN
        RETURN '{}';
    END IF;
    RETURN postback_waiting_for(p_id);
END
$$;
