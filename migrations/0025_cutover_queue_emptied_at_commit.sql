-- The mirror's per-transaction queue no longer grows with the connection's age (issue 16;
-- numbers in docs/performance.md, "Dual-write").
--
-- Before: the queue (0006) was two temporary tables emptied by DELETE at each COMMIT.
-- Temporary tables are never vacuumed, so every row a connection ever queued stayed behind
-- as a dead row, and each COMMIT's `WHERE txid = me` scanned them all: a connection's
-- mirror got slower the longer it lived (one writer's deposits, 1,400 a second, fell to
-- 950 within 90 s; an application's pooled connections live for days).
--
-- Now: one table under a new name, `ON COMMIT DELETE ROWS`: PostgreSQL truncates it in
-- place at the end of every transaction that used the temporary schema (after the deferred
-- sync has run), rolled-back rows included. The per-transaction marker table and its unique
-- index are gone (an index is rebuilt at each truncation): the transaction's first queued
-- row opens the queue (`opens`, the only row the deferred trigger's WHEN lets through), and
-- a transaction-local setting, cutover.queued_txid, says whether this transaction has
-- opened it — undone with the row by a rolled-back savepoint. Sessions that created the old
-- tables keep them, unused.
--
-- No column may need TOAST: truncating a table truncates its TOAST table too, and rebuilding
-- the TOAST table's index updates pg_class, which at every COMMIT cost more than the dead
-- rows did (and left a dead catalog row each time). Bounded VARCHARs keep the largest row
-- under the TOAST threshold, so PostgreSQL creates no TOAST table; a query type name (or a
-- fingerprint) longer than the bound is cut to it (rule names are identifiers: far shorter).

CREATE OR REPLACE FUNCTION cutover.ensure_queue()
RETURNS VOID
LANGUAGE plpgsql
AS $$
BEGIN
    IF to_regclass('pg_temp.cutover_mirror_queue') IS NOT NULL THEN
        RETURN;
    END IF;
    CREATE TEMP TABLE cutover_mirror_queue (
        txid         BIGINT NOT NULL,
        affiliate_id BIGINT NOT NULL,
        query_type   VARCHAR(300),
        fingerprint  VARCHAR(100),
        statement_at TIMESTAMPTZ NOT NULL,
        legacy_us    BIGINT NOT NULL,
        opens        BOOLEAN NOT NULL
    ) ON COMMIT DELETE ROWS;
    CREATE CONSTRAINT TRIGGER cutover_mirror_at_commit
        AFTER INSERT ON pg_temp.cutover_mirror_queue
        DEFERRABLE INITIALLY DEFERRED
        FOR EACH ROW WHEN (NEW.opens) EXECUTE FUNCTION cutover.mirror_at_commit();
END;
$$;

-- 0020's, with the new queue; the proxy's tag read with one regular expression instead
-- of two, and ensure_queue() asked only by a transaction's first write.
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
    tag       TEXT[];
    marked    BOOLEAN;
    keys      BIGINT[];
    took      BIGINT;
    prev_flag TEXT;
    started   TIMESTAMPTZ;
    failed    BIGINT[];
BEGIN
    -- (dual-write is on: the trigger's WHEN asked, just before)
    me := txid_current();
    tag := regexp_match(current_query(), '/\* cutover:([A-Za-z0-9_]+) ([A-Za-z0-9_]+) \*/\s*$');
    qt := tag[1];
    fp := tag[2];
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
    -- The transaction's first key opens the queue (which exists from then on): its row's
    -- deferred trigger runs the sync at COMMIT, once. The setting first: under SET
    -- CONSTRAINTS ALL IMMEDIATE the trigger runs the sync at the end of this INSERT, and the
    -- sync resets it, so that the next write opens the queue again.
    marked := coalesce(current_setting('cutover.queued_txid', true), '') = me::TEXT;
    IF NOT marked THEN
        PERFORM cutover.ensure_queue();
        PERFORM set_config('cutover.queued_txid', me::TEXT, true);
    END IF;
    INSERT INTO pg_temp.cutover_mirror_queue
        (txid, affiliate_id, query_type, fingerprint, statement_at, legacy_us, opens)
    SELECT me, k, left(qt, 300), left(fp, 100), statement_timestamp(), took,
           NOT marked AND n = 1
    FROM unnest(keys) WITH ORDINALITY AS u(k, n);

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

-- 0006's, reading the new queue.
CREATE OR REPLACE FUNCTION cutover.sync_isolated(p_keys BIGINT[], p_txid BIGINT, p_detach_dangling BOOLEAN DEFAULT false)
RETURNS BIGINT[]
LANGUAGE plpgsql
SET search_path = fature_v2, public
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    k      BIGINT;
    failed BIGINT[] := '{}';
    qt     TEXT;
    fp     TEXT;
    e_state TEXT; e_message TEXT; e_constraint TEXT;
BEGIN
    BEGIN
        PERFORM cutover.sync_to_target(p_keys, p_detach_dangling);
    EXCEPTION
    -- A serialization failure (REPEATABLE READ, SERIALIZABLE) is the writer's to retry, as
    -- PostgreSQL's own would be: recording it instead would leave v2 behind.
    WHEN serialization_failure THEN
        RAISE;
    WHEN OTHERS THEN
        -- Parents first, by their depth among the keys, as legacy has them.
        FOR k IN
            WITH RECURSIVE q AS (
                SELECT l.affiliate_id, l.parent_affiliate_id FROM public.affiliates l
                WHERE l.affiliate_id = ANY (p_keys)
            ), ordered (affiliate_id, depth) AS (
                SELECT q.affiliate_id, 0 FROM q
                WHERE NOT EXISTS (SELECT 1 FROM q p WHERE p.affiliate_id = q.parent_affiliate_id)
                UNION ALL
                SELECT c.affiliate_id, o.depth + 1 FROM ordered o JOIN q c ON c.parent_affiliate_id = o.affiliate_id
            )
            SELECT u.id FROM unnest(p_keys) AS u(id) LEFT JOIN ordered o ON o.affiliate_id = u.id
            ORDER BY o.depth NULLS LAST, u.id
        LOOP
            BEGIN
                PERFORM cutover.sync_to_target(ARRAY[k], p_detach_dangling);
            EXCEPTION
            WHEN serialization_failure THEN
                RAISE;
            WHEN OTHERS THEN
                GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_message = MESSAGE_TEXT,
                                        e_constraint = CONSTRAINT_NAME;
                failed := failed || k;
                -- A row the backfill quarantined (an orphan, a cycle) is reported there.
                CONTINUE WHEN EXISTS (SELECT 1 FROM cutover.backfill_quarantine q
                                      WHERE q.affiliate_id = k);
                -- The statement that queued the key, if a transaction of this session did
                -- (the backfill's replay has none, nor the queue's temporary table).
                IF p_txid IS NOT NULL THEN
                    SELECT p.query_type, p.fingerprint INTO qt, fp
                    FROM pg_temp.cutover_mirror_queue p
                    WHERE p.txid = p_txid AND p.affiliate_id = k
                    ORDER BY p.statement_at DESC LIMIT 1;
                END IF;
                INSERT INTO cutover.write_divergences
                    (direction, operation, affiliate_id, sqlstate, message, constraint_name,
                     query_type, fingerprint)
                SELECT 'legacy_to_target',
                       CASE WHEN NOT EXISTS (SELECT 1 FROM public.affiliates l WHERE l.affiliate_id = k)
                            THEN 'DELETE'
                            WHEN NOT EXISTS (SELECT 1 FROM affiliates_optimized v WHERE v.affiliate_id = k)
                            THEN 'INSERT' ELSE 'UPDATE' END,
                       k, e_state, e_message, nullif(e_constraint, ''), qt, fp;
            END;
        END LOOP;
    END;
    RETURN failed;
END;
$$;

-- 0006's, with the new queue. Its rows go at the end of the transaction; they are deleted
-- here as well, and the marker setting reset, for a sync run before COMMIT by SET
-- CONSTRAINTS ALL IMMEDIATE: the transaction's later writes queue a marker of their own.
CREATE OR REPLACE FUNCTION cutover.mirror_at_commit()
RETURNS TRIGGER
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = fature_v2, public
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    me        BIGINT := txid_current();
    keys      BIGINT[];
    k         BIGINT;
    started   TIMESTAMPTZ := clock_timestamp();
    took_us   BIGINT;
    failed    BIGINT[] := '{}';
    prev_flag TEXT := coalesce(current_setting('cutover.mirroring', true), '');
    deferred  BOOLEAN := false;
    g         RECORD;
    e_state TEXT; e_message TEXT;
BEGIN
    -- Nothing here may fail the COMMIT: whatever escapes the sync's own handling is recorded
    -- against every queued key (and, should even that fail, logged on the server).
    BEGIN
        keys := ARRAY(SELECT DISTINCT affiliate_id FROM pg_temp.cutover_mirror_queue WHERE txid = me);
        IF cardinality(keys) > 0 AND cutover.backfill_running() THEN
            -- Handed to the backfill. It drains this table under an exclusive lock before it
            -- says it is done: an insert that waited for that lock sees it done now (a new
            -- snapshot per statement), takes its keys back and syncs them itself.
            INSERT INTO cutover.backfill_catchup (affiliate_id)
            SELECT unnest(keys) ON CONFLICT DO NOTHING;
            IF cutover.backfill_running() THEN
                deferred := true;
            ELSE
                DELETE FROM cutover.backfill_catchup WHERE affiliate_id = ANY (keys);
            END IF;
        END IF;
        IF cardinality(keys) > 0 AND NOT deferred THEN
            PERFORM set_config('cutover.mirroring', 'on', true);
            failed := cutover.sync_isolated(keys, me);
            PERFORM set_config('cutover.mirroring', prev_flag, true);
        END IF;
    EXCEPTION
    WHEN serialization_failure THEN
        RAISE;
    WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_message = MESSAGE_TEXT;
        BEGIN
            PERFORM set_config('cutover.mirroring', prev_flag, true);
            INSERT INTO cutover.write_divergences
                (direction, operation, affiliate_id, sqlstate, message, query_type, fingerprint)
            SELECT DISTINCT ON (p.affiliate_id) 'legacy_to_target', 'UPDATE', p.affiliate_id,
                   e_state, e_message, p.query_type, p.fingerprint
            FROM pg_temp.cutover_mirror_queue p WHERE p.txid = me;
            failed := keys;
        EXCEPTION WHEN OTHERS THEN
            RAISE LOG 'cutover dual-write: sync failed and could not be recorded: % %',
                e_state, e_message;
        END;
    END;

    took_us := (extract(epoch FROM clock_timestamp() - started) * 1e6)::BIGINT;

    -- One report per query type the proxy tagged: statements, rows, time on each side.
    -- Bookkeeping must never fail a COMMIT: a failure here goes to the server log only.
    BEGIN
        FOR g IN
            SELECT p.query_type, count(DISTINCT p.statement_at) AS statements,
                   count(DISTINCT p.affiliate_id) AS keys,
                   bool_or(p.affiliate_id = ANY (failed)) AS any_failed,
                   (SELECT sum(s.legacy_us) FROM (SELECT DISTINCT statement_at, legacy_us
                                                    FROM pg_temp.cutover_mirror_queue
                                                    WHERE txid = me AND query_type = p.query_type) s
                   )::BIGINT AS legacy_us
            FROM pg_temp.cutover_mirror_queue p
            WHERE p.txid = me AND p.query_type IS NOT NULL
            GROUP BY p.query_type
        LOOP
            PERFORM cutover.report_dual_write(
                CASE WHEN deferred THEN 'CV003' WHEN g.any_failed THEN 'CV001' ELSE 'CV000' END,
                g.query_type, g.keys,
                g.statements, g.legacy_us, took_us * g.keys / greatest(cardinality(keys), 1));
        END LOOP;
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_message = MESSAGE_TEXT;
        RAISE LOG 'cutover dual-write: report failed: % %', e_state, e_message;
    END;

    DELETE FROM pg_temp.cutover_mirror_queue WHERE txid = me;
    PERFORM set_config('cutover.queued_txid', '', true);
    RETURN NULL;
END;
$$;
