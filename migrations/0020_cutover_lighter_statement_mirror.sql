-- The mirror's per-statement path, lighter (issue 16; numbers in docs/performance.md,
-- "Dual-write"). Same behaviour.
--
-- 1. Its small helpers in PL/pgSQL instead of SQL. A SQL function the planner does not
--    inline is parsed and planned again in every transaction that calls it from PL/pgSQL
--    (its cache lives in the transaction's expression state): the mirror called five of them
--    at every write statement or COMMIT. PL/pgSQL keeps its plans for the session.
-- 2. queue_legacy_write (0014's) reads the statement's fingerprint once, not once per key.

CREATE OR REPLACE FUNCTION cutover.statement_query_type()
RETURNS TEXT
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN substring(current_query() FROM '/\* cutover:([A-Za-z0-9_]+) [A-Za-z0-9_]+ \*/\s*$');
END;
$$;

CREATE OR REPLACE FUNCTION cutover.statement_fingerprint()
RETURNS TEXT
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN substring(current_query() FROM '/\* cutover:[A-Za-z0-9_]+ ([A-Za-z0-9_]+) \*/\s*$');
END;
$$;

CREATE OR REPLACE FUNCTION cutover.dual_write_strict(p_query_type TEXT)
RETURNS BOOLEAN
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    IF p_query_type IS NULL THEN
        RETURN false;
    END IF;
    RETURN coalesce((SELECT dual_write = 'strict' FROM cutover.query_type_state
                     WHERE query_type = p_query_type), false);
END;
$$;

CREATE OR REPLACE FUNCTION cutover.backfill_running()
RETURNS BOOLEAN
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN NOT EXISTS (SELECT 1 FROM cutover.backfill_progress WHERE phase = 'done');
END;
$$;

CREATE OR REPLACE FUNCTION cutover.wrote_v2_first()
RETURNS BOOLEAN
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN coalesce(current_setting('cutover.v2_first', true), '') = 'on';
END;
$$;

CREATE OR REPLACE FUNCTION cutover.queue_legacy_write()
RETURNS TRIGGER
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = fature_v2, public
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    me        BIGINT;
    qt        TEXT;
    fp        TEXT;
    keys      BIGINT[];
    took      BIGINT;
    prev_flag TEXT;
    started   TIMESTAMPTZ;
    failed    BIGINT[];
BEGIN
    -- (dual-write is on: the trigger's WHEN asked, just before)
    me := txid_current();
    qt := cutover.statement_query_type();
    fp := cutover.statement_fingerprint();
    took := greatest(0, (extract(epoch FROM clock_timestamp() - statement_timestamp()) * 1e6)::BIGINT);
    IF TG_OP = 'INSERT' THEN
        keys := ARRAY(SELECT affiliate_id FROM new_rows);
    ELSIF TG_OP = 'UPDATE' THEN
        keys := ARRAY(SELECT affiliate_id FROM new_rows UNION SELECT affiliate_id FROM old_rows);
    ELSE
        keys := ARRAY(SELECT affiliate_id FROM old_rows);
    END IF;
    IF cardinality(keys) = 0 THEN
        RETURN NULL;
    END IF;
    PERFORM cutover.ensure_queue();
    INSERT INTO pg_temp.cutover_pending_mirror
        (txid, affiliate_id, query_type, fingerprint, statement_at, legacy_us)
    SELECT me, k, qt, fp, statement_timestamp(), took
    FROM unnest(keys) AS k;
    INSERT INTO pg_temp.cutover_pending_mirror_tx (txid) VALUES (me) ON CONFLICT DO NOTHING;

    IF cutover.dual_write_strict(qt) AND NOT cutover.backfill_running() THEN
        prev_flag := coalesce(current_setting('cutover.mirroring', true), '');
        PERFORM set_config('cutover.mirroring', 'on', true);
        BEGIN
            PERFORM cutover.sync_to_target(keys);
        EXCEPTION WHEN OTHERS THEN
            PERFORM cutover.report_statement('CV002', 'legacy_to_target', qt, cardinality(keys),
                                             clock_timestamp(), clock_timestamp());
            RAISE;
        END;
        PERFORM set_config('cutover.mirroring', prev_flag, true);
    ELSIF cutover.wrote_v2_first() AND NOT cutover.backfill_running() THEN
        prev_flag := coalesce(current_setting('cutover.mirroring', true), '');
        started := clock_timestamp();
        PERFORM set_config('cutover.mirroring', 'on', true);
        failed := cutover.sync_isolated(keys, me);
        PERFORM set_config('cutover.mirroring', prev_flag, true);
        IF cardinality(failed) > 0 THEN
            PERFORM cutover.report_statement('CV001', 'legacy_to_target', qt, cardinality(keys),
                                             started, clock_timestamp());
        END IF;
    END IF;
    RETURN NULL;
END;
$$;
