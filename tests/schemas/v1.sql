-- Postback relay schema. Idempotent: applying it again changes nothing.
-- Postgres is the record; Redis only carries work to the workers.

CREATE TABLE IF NOT EXISTS callbacks (
    id            bigserial PRIMARY KEY,
    affiliate_id  text        NOT NULL CHECK (length(affiliate_id) BETWEEN 1 AND 64),
    event_type    text        NOT NULL CHECK (event_type IN ('order.created', 'order.updated')),
    method        text        NOT NULL CHECK (method IN ('GET', 'POST')),
    url_template  text        NOT NULL,
    secret        text,
    enabled       boolean     NOT NULL DEFAULT true,
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now(),
    UNIQUE (affiliate_id, event_type)
);

-- One row per (event, callback key): the id is derived from the event id, affiliate and
-- event type, so a repeated event id never creates a second delivery, and the receiver sees
-- the same Idempotency-Key on every try.
CREATE TABLE IF NOT EXISTS deliveries (
    id            uuid        PRIMARY KEY,
    event_id      text        NOT NULL,
    event_type    text        NOT NULL,
    affiliate_id  text        NOT NULL,
    order_number  text        NOT NULL,
    callback_id   bigint,     -- no foreign key: the record outlives a removed callback
    event         jsonb       NOT NULL,
    state         text        NOT NULL CHECK (state IN ('pending', 'delivered', 'failed', 'skipped')),
    reason        text,
    request       jsonb,      -- the rendered request: method, url, headers, body
    attempts      integer     NOT NULL DEFAULT 0,  -- kept here so listings need no count
    created_at    timestamptz NOT NULL DEFAULT now(),
    updated_at    timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX IF NOT EXISTS deliveries_affiliate_created ON deliveries (affiliate_id, created_at);
CREATE INDEX IF NOT EXISTS deliveries_order ON deliveries (order_number);
CREATE INDEX IF NOT EXISTS deliveries_state ON deliveries (state) WHERE state <> 'delivered';

CREATE TABLE IF NOT EXISTS attempts (
    id               bigserial   PRIMARY KEY,
    delivery_id      uuid        NOT NULL REFERENCES deliveries (id) ON DELETE CASCADE,
    number           integer     NOT NULL,
    started_at       timestamptz NOT NULL,
    duration_ms      double precision NOT NULL,
    status_code      integer,
    error_class      text,
    error            text,
    response_excerpt text,
    UNIQUE (delivery_id, number)
);
