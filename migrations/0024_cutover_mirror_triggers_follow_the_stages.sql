-- The mirror's triggers are enabled only while some query type dual-writes (issue 16's bar:
-- the triggers may cost legacy's writes at most 10% while dual-write is off; numbers in
-- docs/performance.md, "Dual-write").
--
-- Before: the seven triggers were always enabled and asked, at every write statement on
-- either table, whether dual-write was on (`WHEN (cutover.dual_write_active())`: a PL/pgSQL
-- EXISTS over cutover.query_type_state through SPI). With every query type at `legacy` that
-- question alone cost legacy's one-row writes 16–17%; a trigger's WHEN cannot hold a
-- subquery, and nothing cheaper can read a table.
--
-- Now: the question is answered when the answer changes. A statement trigger on
-- cutover.query_type_state (every path that changes a stage: the control plane, the console,
-- an operator's SQL, the proxy's seeding of the rules' baseline) calls
-- cutover.sync_mirror_triggers(), which enables or disables them inside that same
-- transaction:
--   - public.affiliates' four (legacy → v2): while any query type is in shadow, cutover or
--     target (what dual_write_active() asked);
--   - fature_v2.affiliates_optimized's three (v2 → legacy): while any is in target (what
--     reverse_mirror_active() asked).
-- The WHEN keeps only the per-session part (backfill, repair and the mirror's own writes set
-- cutover.mirroring or cutover.bulk_load): two GUC lookups, no SPI.
--
-- The price, paid at a switch and not at each write: ALTER TABLE … ENABLE/DISABLE TRIGGER
-- takes SHARE ROW EXCLUSIVE on the table, which waits for the transactions writing it and
-- makes new writers queue behind it. The lock is asked for with a short lock_timeout
-- (cutover.switch_lock_timeout, default 100ms) and asked again after a pause, up to
-- cutover.switch_attempts times (default 30); a stage change that never gets it fails with
-- 55P03 and changes nothing. The same lock is what makes the switch exact: no transaction
-- writes the table partly before and partly after it, so none is half mirrored.
--
-- Concurrent stage changes: every change of the state takes a transaction-level advisory
-- lock, then decides by a statement that sees every change committed before it got the
-- lock, so two changes cannot each decide from a state the other is changing. That needs
-- READ COMMITTED (a REPEATABLE READ transaction sees the state of its start): a change of
-- cutover.query_type_state at a higher isolation level is refused (0A000). cutover's own
-- stage changes ask for READ COMMITTED.
--
-- Ownership: ALTER TABLE needs the role that migrates (these functions' owner) to own both
-- tables; `cutover migrate` checks it before anything runs.

-- Takes `rel` IN SHARE ROW EXCLUSIVE MODE a short wait at a time (see the header), or fails
-- with 55P03.
CREATE FUNCTION cutover.lock_for_switch(rel REGCLASS)
RETURNS VOID
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    wait TEXT := coalesce(nullif(current_setting('cutover.switch_lock_timeout', true), ''), '100ms');
    attempts INT := coalesce(nullif(current_setting('cutover.switch_attempts', true), ''), '30')::INT;
    previous TEXT := current_setting('lock_timeout');
BEGIN
    FOR attempt IN 1..attempts LOOP
        BEGIN
            PERFORM set_config('lock_timeout', wait, true);
            EXECUTE format('LOCK TABLE %s IN SHARE ROW EXCLUSIVE MODE', rel);
            PERFORM set_config('lock_timeout', previous, true);
            RETURN;
        EXCEPTION WHEN lock_not_available THEN
            -- The subtransaction's rollback put lock_timeout back; let the queued writers by.
            IF attempt < attempts THEN
                PERFORM pg_sleep(0.05);
            END IF;
        END;
    END LOOP;
    RAISE EXCEPTION 'dual-write could not be switched: writers held % past % on each of % attempts', rel, wait, attempts
        USING ERRCODE = 'lock_not_available',
              HINT = 'A long write transaction on the table is open. Retry when it has ended; the stage did not change.';
END;
$$;

-- The tables whose mirror triggers are not as cutover.query_type_state wants them: whether
-- to enable them, and the names to switch.
CREATE FUNCTION cutover.mirror_triggers_to_switch()
RETURNS TABLE (rel REGCLASS, enable BOOLEAN, names NAME[])
LANGUAGE sql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
    WITH wanted AS (
        SELECT 'public.affiliates'::regclass AS rel,
               EXISTS (SELECT 1 FROM cutover.query_type_state
                       WHERE stage IN ('shadow', 'cutover', 'target')) AS enable
        UNION ALL
        SELECT 'fature_v2.affiliates_optimized'::regclass,
               EXISTS (SELECT 1 FROM cutover.query_type_state WHERE stage = 'target')
    )
    SELECT w.rel, w.enable, array_agg(tg.tgname ORDER BY tg.tgname)
    FROM wanted w JOIN pg_trigger tg ON tg.tgrelid = w.rel
    WHERE tg.tgname LIKE 'cutover\_mirror\_%' AND (tg.tgenabled = 'D') = w.enable
    GROUP BY w.rel, w.enable
$$;

-- Enables or disables the mirror's triggers to match cutover.query_type_state (see the
-- header). A statement that changes nothing takes no lock on the tables.
CREATE FUNCTION cutover.sync_mirror_triggers()
RETURNS VOID
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t RECORD;
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'cutover.query_type_state is changed only in READ COMMITTED transactions (this one is %): dual-write''s triggers follow it',
                        current_setting('transaction_isolation')
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'Change the stage in a transaction of its own at the default isolation level.';
    END IF;
    -- Taken by every change of the state, before deciding: the statement below sees every
    -- change committed before the lock was granted, so two changes cannot each decide from a
    -- state the other is changing.
    PERFORM pg_advisory_xact_lock(7166773871928029799);  -- one key, every switch
    FOR t IN SELECT * FROM cutover.mirror_triggers_to_switch() LOOP
        PERFORM cutover.lock_for_switch(t.rel);
        EXECUTE format('ALTER TABLE %s %s', t.rel,
                       (SELECT string_agg(format('%s TRIGGER %I',
                                                 CASE WHEN t.enable THEN 'ENABLE' ELSE 'DISABLE' END, n), ', ')
                        FROM unnest(t.names) n));
    END LOOP;
END;
$$;

CREATE FUNCTION cutover.follow_stages()
RETURNS TRIGGER
LANGUAGE plpgsql
AS $$
BEGIN
    PERFORM cutover.sync_mirror_triggers();
    RETURN NULL;
END;
$$;

CREATE TRIGGER query_type_state_switches_mirror
    AFTER INSERT OR UPDATE OR DELETE OR TRUNCATE ON cutover.query_type_state
    FOR EACH STATEMENT EXECUTE FUNCTION cutover.follow_stages();

-- The WHENs keep only the session's part. (CREATE OR REPLACE enables a trigger: the state
-- is put right below.)
CREATE OR REPLACE TRIGGER cutover_mirror_insert
    AFTER INSERT ON public.affiliates REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT
    WHEN (coalesce(current_setting('cutover.mirroring', true), '') <> 'on'
          AND coalesce(current_setting('cutover.bulk_load', true), '') <> 'on')
    EXECUTE FUNCTION cutover.queue_legacy_write();
CREATE OR REPLACE TRIGGER cutover_mirror_update
    AFTER UPDATE ON public.affiliates REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT
    WHEN (coalesce(current_setting('cutover.mirroring', true), '') <> 'on'
          AND coalesce(current_setting('cutover.bulk_load', true), '') <> 'on')
    EXECUTE FUNCTION cutover.queue_legacy_write();
CREATE OR REPLACE TRIGGER cutover_mirror_delete
    AFTER DELETE ON public.affiliates REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT
    WHEN (coalesce(current_setting('cutover.mirroring', true), '') <> 'on'
          AND coalesce(current_setting('cutover.bulk_load', true), '') <> 'on')
    EXECUTE FUNCTION cutover.queue_legacy_write();
CREATE OR REPLACE TRIGGER cutover_mirror_truncate
    AFTER TRUNCATE ON public.affiliates
    FOR EACH STATEMENT
    WHEN (coalesce(current_setting('cutover.mirroring', true), '') <> 'on'
          AND coalesce(current_setting('cutover.bulk_load', true), '') <> 'on')
    EXECUTE FUNCTION cutover.mirror_legacy_truncate();

CREATE OR REPLACE TRIGGER cutover_mirror_insert
    AFTER INSERT ON fature_v2.affiliates_optimized REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT
    WHEN (coalesce(current_setting('cutover.mirroring', true), '') <> 'on'
          AND coalesce(current_setting('cutover.bulk_load', true), '') <> 'on')
    EXECUTE FUNCTION cutover.mirror_target();
CREATE OR REPLACE TRIGGER cutover_mirror_update
    AFTER UPDATE ON fature_v2.affiliates_optimized
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT
    WHEN (coalesce(current_setting('cutover.mirroring', true), '') <> 'on'
          AND coalesce(current_setting('cutover.bulk_load', true), '') <> 'on')
    EXECUTE FUNCTION cutover.mirror_target();
CREATE OR REPLACE TRIGGER cutover_mirror_delete
    AFTER DELETE ON fature_v2.affiliates_optimized REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT
    WHEN (coalesce(current_setting('cutover.mirroring', true), '') <> 'on'
          AND coalesce(current_setting('cutover.bulk_load', true), '') <> 'on')
    EXECUTE FUNCTION cutover.mirror_target();

SELECT cutover.sync_mirror_triggers();
