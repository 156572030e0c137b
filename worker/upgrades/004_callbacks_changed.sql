-- Version 3 to 4: workers cache callbacks, and a trigger tells them of every change.

CREATE FUNCTION postback_callbacks_changed() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('postback_callbacks', '');
    RETURN NULL;
END
$$;
CREATE TRIGGER callbacks_changed
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON callbacks
    FOR EACH STATEMENT EXECUTE FUNCTION postback_callbacks_changed();
