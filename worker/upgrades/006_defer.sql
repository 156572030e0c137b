-- Version 5 to 6: a delivery whose destination is busy or down is put off by postback_take
-- itself (`p_defer`, the action `deferred`), never claimed. A function's signature cannot
-- be changed by CREATE OR REPLACE, so the one of version 5 goes first.

DROP FUNCTION postback_take(
    uuid, text, text, text, text, timestamptz, bigint, jsonb, text, float8, text, boolean);

CREATE FUNCTION postback_take(
    p_id uuid, p_event_id text, p_event_type text, p_affiliate_id text, p_order_number text,
    p_occurred_at timestamptz, p_callback_id bigint, p_event jsonb, p_job text,
    p_claim_timeout float8, p_close_reason text, p_close_dead boolean, p_defer float8,
    OUT action text, OUT inserted boolean, OUT event jsonb, OUT state text,
    OUT attempts integer, OUT wait float8, OUT claimed_by text, OUT blocked_by uuid,
    OUT retry_base integer, OUT resend jsonb, OUT blocker_id uuid, OUT blocker_event_id text,
    OUT woken text[])
LANGUAGE plpgsql AS $$
#variable_conflict use_column
DECLARE
    d deliveries;
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
            claimed_by = NULL, claimed_at = NULL, blocked_by = NULL, updated_at = now()
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
            UPDATE deliveries SET blocked_by = blocker_id WHERE id = p_id;
            action := 'blocked';
        ELSIF p_defer IS NOT NULL THEN
            UPDATE deliveries
            SET blocked_by = NULL, next_attempt_at = now() + make_interval(secs => p_defer),
                updated_at = now()
            WHERE id = p_id;
            action := 'deferred';
        ELSE
            UPDATE deliveries SET claimed_by = p_job, claimed_at = now(), blocked_by = NULL
            WHERE id = p_id;
            action := 'claimed';
        END IF;
    END IF;
END
$$;
