-- The control plane's audit and change feed (issue 6).
--
-- Every change of a query type's stage or percent, by whom, why, and whether a safety gate
-- was forced. Written in the same transaction as the change.
CREATE TABLE cutover.stage_audit (
    id           BIGSERIAL PRIMARY KEY,
    changed_at   TIMESTAMPTZ NOT NULL DEFAULT now(),
    query_type   TEXT NOT NULL,
    from_stage   TEXT,
    from_percent SMALLINT,
    to_stage     TEXT NOT NULL,
    to_percent   SMALLINT NOT NULL,
    reason       TEXT NOT NULL,
    changed_by   TEXT NOT NULL,   -- the API token's name, the OS user of ctl, the SQL user
    via          TEXT NOT NULL CHECK (via IN ('api', 'sql', 'auto')),
    forced       BOOLEAN NOT NULL DEFAULT false
);
CREATE INDEX stage_audit_recent ON cutover.stage_audit (changed_at DESC);

-- Every replica LISTENs on cutover_state: any change of the live state, through a proxy or
-- by hand in SQL, reaches them all within the transaction's commit.
CREATE FUNCTION cutover.notify_state()
RETURNS TRIGGER
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM pg_notify('cutover_state', NEW.query_type);
    RETURN NULL;
END;
$$;

CREATE TRIGGER query_type_state_notify
    AFTER INSERT OR UPDATE ON cutover.query_type_state
    FOR EACH ROW EXECUTE FUNCTION cutover.notify_state();
