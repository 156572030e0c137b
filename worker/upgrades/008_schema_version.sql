-- Version 7 to 8: the database records its schema's version, so `postback db init` knows
-- which of these steps it still needs. Versions 1 to 7 recorded none: `postback db init`
-- recognises them by what they have, and every one of them comes through this step.

CREATE TABLE schema_version (
    version integer NOT NULL,
    one_row boolean PRIMARY KEY DEFAULT true CHECK (one_row)  -- so never a second row
);
INSERT INTO schema_version (version) VALUES (8);

-- Version 6's schema.sql, upgrading a version 5 database in place, created its
-- postback_take beside version 5's rather than instead of it; nothing calls that one.
DROP FUNCTION IF EXISTS postback_take(
    uuid, text, text, text, text, timestamptz, bigint, jsonb, text, float8, text, boolean);
