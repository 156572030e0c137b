-- Version 2 to 3: replays and discards of dead letters (recorded in `actions`), test fires,
-- and listings paged newest first.

ALTER TABLE deliveries
    ADD COLUMN retry_base integer NOT NULL DEFAULT 0,
    ADD COLUMN resend boolean NOT NULL DEFAULT false,
    DROP CONSTRAINT deliveries_state_check,
    ADD CONSTRAINT deliveries_state_check
        CHECK (state IN ('pending', 'retrying', 'delivered', 'dead', 'skipped', 'discarded'));

CREATE INDEX deliveries_created ON deliveries (created_at, id);

CREATE TABLE actions (
    id          bigserial   PRIMARY KEY,
    delivery_id uuid        NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    action      text        NOT NULL CHECK (action IN ('replay', 'discard')),
    mode        text        CHECK (mode IN ('rerender', 'resend')),
    actor       text        NOT NULL,
    note        text,
    attempt     integer     NOT NULL,
    at          timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX actions_delivery ON actions (delivery_id, id);

CREATE TABLE test_fires (
    id               bigserial   PRIMARY KEY,
    callback_id      bigint,
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
