-- Version 12 to 13: a callback whose deliveries keep dying is disabled on its own, as a 410
-- disables one; what ops and the relay do to a callback or to an affiliate's records is kept
-- in actions; and what ops must hear of is written down for POSTBACK_OPS_WEBHOOK.

-- Actions on a callback (disable, enable) or on an affiliate's records (erase) name those
-- rather than a delivery: an erase outlives the deliveries it removed.
ALTER TABLE actions
    ALTER COLUMN delivery_id DROP NOT NULL,
    ALTER COLUMN attempt DROP NOT NULL,
    ADD COLUMN affiliate_id text,
    ADD COLUMN event_type   text,
    ADD COLUMN callback_id  bigint,
    ADD COLUMN detail       jsonb,
    DROP CONSTRAINT actions_action_check,
    ADD CONSTRAINT actions_action_check
        CHECK (action IN ('replay', 'discard', 'disable', 'enable', 'erase')),
    ADD CONSTRAINT actions_subject CHECK (
        CASE WHEN action IN ('replay', 'discard')
             THEN delivery_id IS NOT NULL AND attempt IS NOT NULL
             ELSE delivery_id IS NULL AND affiliate_id IS NOT NULL END);
CREATE INDEX actions_affiliate ON actions (affiliate_id, id) WHERE delivery_id IS NULL;

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

-- postback_record (and postback_record_many) take the auto-disable rule: two arguments more,
-- with defaults, so workers of version 12 still call them as they did (their callbacks'
-- streaks are counted, and never disable one). The old functions go first: kept, they would
-- make those calls ambiguous.
DROP FUNCTION postback_record_many(
    uuid[], text[], text[], bigint[], text[], text[], text[], float8[], jsonb[],
    timestamptz[], float8[], integer[], text[], text[], text[], boolean[], jsonb[]);
DROP FUNCTION postback_record(
    uuid, text, text, bigint, text, text, text, float8, jsonb, timestamptz, float8, integer,
    text, text, text, boolean, jsonb);

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
