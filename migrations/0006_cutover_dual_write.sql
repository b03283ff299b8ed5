-- Dual-write: every write on one side of the migration lands on the other side, inside the
-- writer's own transaction. Reference: docs/dual-write.md.
--
-- Where it runs. Both schemas live in one database, so the mirror is in the database:
-- statement-level AFTER triggers with transition tables on public.affiliates see exactly the
-- keys each statement wrote, in every protocol, prepared or not — INSERT (ON CONFLICT
-- included), UPDATE (FROM), DELETE (USING), COPY FROM, INSERT … SELECT — and queue them; a
-- deferred trigger brings v2 level with legacy for those keys at COMMIT ("v2 := legacy for
-- these keys": the serial id, defaults, now(), other triggers' changes, whatever legacy ended
-- with). Savepoints and rollbacks undo the queue with the rows. Nothing on the client's
-- wire changes. Why at COMMIT: see the legacy → v2 section below (deadlocks).
--
-- When. While any query type is in a stage that dual-writes (shadow, cutover, target) —
-- the live state in cutover.query_type_state — and not in a session that writes both sides
-- itself (cutover.mirroring = 'on': backfill, repair, and the mirror's own writes).
--
-- Direction. A statement on public.affiliates is mirrored into fature_v2 (legacy is
-- authoritative); a statement on fature_v2.affiliates_optimized — what the proxy sends from
-- stage target on — is mirrored into public.affiliates inside the statement (v2 is
-- authoritative), so a rollback to legacy stays possible until complete.
--
-- Isolation. The sync runs in a subtransaction: a failure on the mirrored side (constraint,
-- trigger, a missing parent, a cycle) is retried key by key, and each key that still fails
-- is recorded in cutover.write_divergences with its SQLSTATE, message and query type; the
-- writer's statements and COMMIT go on untouched — except a serialization failure, which
-- only REPEATABLE READ and SERIALIZABLE writers meet: it fails the COMMIT as PostgreSQL's own
-- would, the writer retries, and v2 is never left behind. v2's deferred parent key is checked inside
-- that subtransaction (SET CONSTRAINTS … IMMEDIATE), so it can never surface at the
-- writer's COMMIT. A query type whose dual_write is 'strict' is synced inside the statement,
-- so that v2's error fails the statement instead.
--
-- Query types. The proxy appends `/* cutover:<query type> <fingerprint> */` to the statements it
-- classified as writes on the table; the mirror reads it back from current_query() to
-- attribute failures, apply strict mode, and report what it did to the proxy in a NOTICE
-- (SQLSTATE CV000/CV001/CV002) that the proxy consumes, so the client never sees it. A
-- statement without the tag (a writer that bypassed the proxy) is mirrored all the same,
-- isolated, silently.
--
-- Plans. The mirror's statements take arrays of keys; left to choose, the plan cache
-- re-planned them at every call (0.3 ms each, measured): generic plans, looked up by key in
-- the primary keys, are forced.
--
-- Privileges. The mirror's functions are SECURITY DEFINER (owned by the role that migrates):
-- the application's role needs no rights on fature_v2 or cutover.

DO $$
BEGIN
    IF to_regclass('public.affiliates') IS NULL THEN
        RAISE EXCEPTION 'dual-write needs the legacy table public.affiliates, which this database does not have'
            USING ERRCODE = 'undefined_table',
                  HINT = 'Migrate the database that holds the application''s affiliates table.';
    END IF;
END $$;

-- Live state of each query type (the control plane writes it; the proxy seeds the rules'
-- baseline). Stage and percent are issue 6's; dual_write is read here.
CREATE TABLE cutover.query_type_state (
    query_type TEXT PRIMARY KEY,
    stage      TEXT NOT NULL DEFAULT 'legacy'
               CHECK (stage IN ('legacy', 'shadow', 'cutover', 'target', 'complete')),
    percent    SMALLINT NOT NULL DEFAULT 0 CHECK (percent BETWEEN 0 AND 100),
    dual_write TEXT NOT NULL DEFAULT 'isolated' CHECK (dual_write IN ('isolated', 'strict')),
    updated_at TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Writes that reached one side and not the other: the repair queue.
CREATE TABLE cutover.write_divergences (
    id              BIGSERIAL PRIMARY KEY,
    occurred_at     TIMESTAMPTZ NOT NULL DEFAULT clock_timestamp(),
    direction       TEXT NOT NULL CHECK (direction IN ('legacy_to_target', 'target_to_legacy')),
    operation       TEXT NOT NULL CHECK (operation IN ('INSERT', 'UPDATE', 'DELETE', 'TRUNCATE')),
    affiliate_id    BIGINT,          -- NULL for a TRUNCATE
    sqlstate        TEXT NOT NULL,
    message         TEXT NOT NULL,   -- the error's message only: its DETAIL may hold values
    constraint_name TEXT,
    query_type      TEXT,            -- NULL when the write bypassed the proxy
    fingerprint     TEXT,            -- the statement's fp_… id, as the proxy classified it
    repaired_at     TIMESTAMPTZ
);
CREATE INDEX write_divergences_pending
    ON cutover.write_divergences (affiliate_id) WHERE repaired_at IS NULL;

-- Whether writes are mirrored now, for this session. PL/pgSQL, not SQL: its plan is cached
-- for the session, and it is asked at every write statement on either table (in the
-- triggers' WHEN, so that, off, no trigger function is entered at all). Measured on
-- deposits with dual-write off: a SQL function here cost 60% of legacy's write rate (it is
-- planned anew at each call), this one about 12% (the transition tables' capture).
CREATE FUNCTION cutover.dual_write_active()
RETURNS BOOLEAN
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN coalesce(current_setting('cutover.mirroring', true), '') <> 'on'
       AND coalesce(current_setting('cutover.bulk_load', true), '') <> 'on'
       AND EXISTS (SELECT 1 FROM cutover.query_type_state
                   WHERE stage IN ('shadow', 'cutover', 'target'));
END;
$$;

-- The query type the proxy tagged the running statement with, or NULL.
CREATE FUNCTION cutover.statement_query_type()
RETURNS TEXT
LANGUAGE sql STABLE
AS $$
    SELECT substring(current_query() FROM '/\* cutover:([A-Za-z0-9_]+) [A-Za-z0-9_]+ \*/\s*$')
$$;

-- The fingerprint id of the running statement, from the same tag.
CREATE FUNCTION cutover.statement_fingerprint()
RETURNS TEXT
LANGUAGE sql STABLE
AS $$
    SELECT substring(current_query() FROM '/\* cutover:[A-Za-z0-9_]+ ([A-Za-z0-9_]+) \*/\s*$')
$$;

CREATE FUNCTION cutover.dual_write_strict(p_query_type TEXT)
RETURNS BOOLEAN
LANGUAGE sql STABLE
AS $$
    SELECT coalesce((SELECT dual_write = 'strict' FROM cutover.query_type_state
                     WHERE query_type = p_query_type), false)
$$;

-- Tells the proxy what the mirror did (only for statements the proxy tagged). Sent at
-- NOTICE whatever the session's client_min_messages, which is put back afterwards.
CREATE FUNCTION cutover.report_dual_write(
    p_code TEXT, p_query_type TEXT, p_rows BIGINT, p_statements BIGINT, p_legacy_us BIGINT,
    p_target_us BIGINT
)
RETURNS VOID
LANGUAGE plpgsql
AS $$
DECLARE
    level TEXT := current_setting('client_min_messages');
    quiet BOOLEAN := level NOT IN ('debug5', 'debug4', 'debug3', 'debug2', 'debug1', 'log', 'notice');
BEGIN
    IF p_query_type IS NULL THEN
        RETURN;
    END IF;
    IF quiet THEN
        PERFORM set_config('client_min_messages', 'notice', true);
    END IF;
    RAISE NOTICE USING ERRCODE = p_code,
        MESSAGE = format('cutover dual-write qt=%s rows=%s statements=%s legacy_us=%s target_us=%s',
                         p_query_type, p_rows, p_statements, p_legacy_us, p_target_us);
    IF quiet THEN
        PERFORM set_config('client_min_messages', level, true);
    END IF;
END;
$$;

-- The same, for a mirror that ran inside the statement: the first side's time is from the
-- statement's start to the mirror's, the other side's the mirror's own.
CREATE FUNCTION cutover.report_statement(
    p_code TEXT, p_direction TEXT, p_query_type TEXT, p_rows BIGINT, p_started TIMESTAMPTZ,
    p_mirrored TIMESTAMPTZ
)
RETURNS VOID
LANGUAGE sql
AS $$
    SELECT cutover.report_dual_write(p_code, p_query_type, p_rows, 1,
        CASE WHEN p_direction = 'legacy_to_target' THEN f ELSE m END,
        CASE WHEN p_direction = 'legacy_to_target' THEN m ELSE f END)
    FROM (SELECT greatest(0, (extract(epoch FROM p_started - statement_timestamp()) * 1e6)::BIGINT) AS f,
                 (extract(epoch FROM p_mirrored - p_started) * 1e6)::BIGINT AS m) t
$$;

-- Records a failed mirror for each key.
CREATE FUNCTION cutover.record_write_divergence(
    p_direction TEXT, p_operation TEXT, p_keys BIGINT[], p_sqlstate TEXT, p_message TEXT,
    p_constraint TEXT, p_query_type TEXT
)
RETURNS VOID
LANGUAGE sql
AS $$
    INSERT INTO cutover.write_divergences
        (direction, operation, affiliate_id, sqlstate, message, constraint_name, query_type,
         fingerprint)
    SELECT p_direction, p_operation, k, p_sqlstate, p_message, nullif(p_constraint, ''), p_query_type,
           cutover.statement_fingerprint()
    FROM unnest(CASE WHEN cardinality(p_keys) > 0 THEN p_keys ELSE ARRAY[NULL::BIGINT] END) AS k
$$;

-- An isolated failure of a mirror that ran inside the statement: recorded for every key,
-- and reported.
CREATE FUNCTION cutover.mirror_failed(
    p_direction TEXT, p_operation TEXT, p_keys BIGINT[], p_query_type TEXT, p_rows BIGINT,
    p_started TIMESTAMPTZ, p_sqlstate TEXT, p_message TEXT, p_constraint TEXT
)
RETURNS VOID
LANGUAGE sql
AS $$
    SELECT cutover.record_write_divergence(p_direction, p_operation, p_keys, p_sqlstate,
                                           p_message, p_constraint, p_query_type);
    SELECT cutover.report_statement('CV001', p_direction, p_query_type, p_rows, p_started,
                                    clock_timestamp());
$$;

-- ---------------------------------------------------------------------------------------
-- legacy → v2: keys queued by each statement, v2 brought level with legacy at COMMIT
-- ---------------------------------------------------------------------------------------
--
-- Why at commit. v2 keeps counters on every ancestor (total_network_size), so each insert
-- or move locks the whole path up to the root in v2. Mirrored statement by statement, two
-- transactions of several statements each would lock those shared rows in the order their
-- statements came, and deadlock where legacy alone never would. Queued and synced once, at
-- COMMIT, every transaction takes its v2 locks in one phase, in key order, after all of its
-- legacy locks: no cycle can form. And syncing keys to legacy's final state ("v2 := legacy
-- for these keys") is idempotent and order-free: savepoints, rollbacks, rows written twice
-- in one transaction, a changed affiliate_id, all come out right.

-- The keys the session's open transaction wrote, with the statement's query type and the
-- time it spent on legacy (pg_temp.cutover_pending_mirror), and one row per transaction
-- whose deferred trigger runs the sync at COMMIT (pg_temp.cutover_pending_mirror_tx). In the
-- session's temporary schema, created on first use: rows live and die inside their
-- transaction, and PostgreSQL takes no SSI predicate locks on temporary tables — in shared
-- tables this bookkeeping made concurrent SERIALIZABLE writers conflict with each other
-- (70% serialization failures, measured). A transaction that used them cannot PREPARE
-- TRANSACTION (two-phase commit).
CREATE FUNCTION cutover.ensure_queue()
RETURNS VOID
LANGUAGE plpgsql
AS $$
BEGIN
    IF to_regclass('pg_temp.cutover_pending_mirror_tx') IS NOT NULL THEN
        RETURN;
    END IF;
    CREATE TEMP TABLE IF NOT EXISTS cutover_pending_mirror (
        txid         BIGINT NOT NULL,
        affiliate_id BIGINT NOT NULL,
        query_type   TEXT,
        fingerprint  TEXT,
        statement_at TIMESTAMPTZ NOT NULL,
        legacy_us    BIGINT NOT NULL
    );
    CREATE TEMP TABLE cutover_pending_mirror_tx (
        txid BIGINT PRIMARY KEY
    );
    CREATE CONSTRAINT TRIGGER cutover_mirror_at_commit
        AFTER INSERT ON pg_temp.cutover_pending_mirror_tx
        DEFERRABLE INITIALLY DEFERRED
        FOR EACH ROW EXECUTE FUNCTION cutover.mirror_at_commit();
END;
$$;

-- v2 := legacy for these keys (missing rows inserted parents first, extra ones deleted,
-- different ones updated; derived columns left to v2's triggers). Takes v2's row locks for
-- everything its triggers will write — the rows, their old and new ancestors, their
-- subtrees — up front and in key order.
CREATE FUNCTION cutover.sync_to_target(p_keys BIGINT[], p_detach_dangling BOOLEAN DEFAULT false)
RETURNS VOID
LANGUAGE plpgsql
SET search_path = fature_v2, public
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    locked     BIGINT[] := '{}';
    more       BIGINT[];
    gone       BIGINT[];   -- in v2, no longer in legacy
    missing    BIGINT[];   -- in legacy, not yet in v2
    structural BIGINT[];   -- whose place in the tree changes: gone, missing or moved
    dangling   BIGINT[] := '{}';
BEGIN
    -- One look at both sides sorts the keys. A deposit or a status change is none of the
    -- above: it locks its own row and costs one UPDATE.
    SELECT coalesce(array_agg(k) FILTER (WHERE l.affiliate_id IS NULL AND v.affiliate_id IS NOT NULL), '{}'),
           coalesce(array_agg(k) FILTER (WHERE l.affiliate_id IS NOT NULL AND v.affiliate_id IS NULL), '{}'),
           coalesce(array_agg(k) FILTER (WHERE
                l.affiliate_id IS NULL OR v.affiliate_id IS NULL
                OR (l.parent_affiliate_id IS DISTINCT FROM v.parent_affiliate_id
                    AND NOT (v.parent_affiliate_id IS NULL AND EXISTS (
                        SELECT 1 FROM detached_affiliates d
                        WHERE d.affiliate_id = k AND d.former_parent_id = l.parent_affiliate_id)))), '{}')
      INTO gone, missing, structural
    FROM unnest(p_keys) AS k
    LEFT JOIN public.affiliates l ON l.affiliate_id = k
    LEFT JOIN affiliates_optimized v ON v.affiliate_id = k;

    IF cardinality(structural) = 0 THEN
        PERFORM 1 FROM affiliates_optimized
        WHERE affiliate_id = ANY (p_keys)
        ORDER BY affiliate_id
        FOR UPDATE;
    ELSE
        LOOP
            more := ARRAY(
                SELECT id FROM (
                    SELECT unnest(p_keys) AS id
                    UNION
                    SELECT t.label::BIGINT
                    FROM affiliates_optimized v,
                         unnest(string_to_array(v.hierarchy_path::TEXT, '.')) AS t(label)
                    WHERE v.affiliate_id = ANY (structural)
                    UNION
                    SELECT t.label::BIGINT
                    FROM public.affiliates l
                    JOIN affiliates_optimized v ON v.affiliate_id = l.parent_affiliate_id,
                         unnest(string_to_array(v.hierarchy_path::TEXT, '.')) AS t(label)
                    WHERE l.affiliate_id = ANY (structural)
                    UNION
                    SELECT h.descendant_id FROM hierarchy_index h WHERE h.ancestor_id = ANY (structural)
                ) s
                WHERE id <> ALL (locked)
            );
            EXIT WHEN cardinality(more) = 0;
            PERFORM 1 FROM affiliates_optimized
            WHERE affiliate_id = ANY (more)
            ORDER BY affiliate_id
            FOR UPDATE;
            locked := locked || more;
        END LOOP;
    END IF;

    IF cardinality(gone) > 0 THEN
        DELETE FROM affiliates_optimized WHERE affiliate_id = ANY (gone);
    END IF;
    -- A quarantined row deleted from legacy leaves the quarantine.
    DELETE FROM cutover.backfill_quarantine q
    WHERE q.affiliate_id = ANY (p_keys)
      AND NOT EXISTS (SELECT 1 FROM public.affiliates l WHERE l.affiliate_id = q.affiliate_id);

    -- A new row under a quarantined one is quarantined too, as the backfill would have done.
    IF cardinality(missing) > 0 THEN
        LOOP
            INSERT INTO cutover.backfill_quarantine (affiliate_id, parent_affiliate_id, reason)
            SELECT l.affiliate_id, l.parent_affiliate_id,
                   format('under quarantined %s', l.parent_affiliate_id)
            FROM public.affiliates l
            WHERE l.affiliate_id = ANY (missing)
              AND EXISTS (SELECT 1 FROM cutover.backfill_quarantine q
                          WHERE q.affiliate_id = l.parent_affiliate_id)
              AND NOT EXISTS (SELECT 1 FROM affiliates_optimized vp
                              WHERE vp.affiliate_id = l.parent_affiliate_id)
            ON CONFLICT (affiliate_id) DO NOTHING;
            EXIT WHEN NOT FOUND;
        END LOOP;
    END IF;
    -- A row the backfill quarantined (an orphan, a cycle, under one) stays out of v2 while
    -- its parent cannot be in it; once its parent is a root's or v2's, it goes in and leaves
    -- the quarantine.
    IF cardinality(missing) > 0 AND EXISTS (SELECT 1 FROM cutover.backfill_quarantine q
                                            WHERE q.affiliate_id = ANY (missing)) THEN
        missing := ARRAY(
            SELECT k FROM unnest(missing) AS k
            JOIN public.affiliates l ON l.affiliate_id = k
            WHERE NOT EXISTS (SELECT 1 FROM cutover.backfill_quarantine q WHERE q.affiliate_id = k)
               OR l.parent_affiliate_id IS NULL
               OR EXISTS (SELECT 1 FROM affiliates_optimized vp
                          WHERE vp.affiliate_id = l.parent_affiliate_id));
        DELETE FROM cutover.backfill_quarantine WHERE affiliate_id = ANY (missing);
    END IF;

    -- Missing rows first, so that a row can be given a parent that was missing.
    IF cardinality(missing) > 0 THEN
        -- Replaying a backfill's hand-over, the order of events is lost: a row whose parent
        -- was deleted meanwhile points at nothing in legacy. Dual-write would have detached
        -- it when the parent went; so does the replay (a root, recorded as detached).
        IF p_detach_dangling THEN
            dangling := ARRAY(
                SELECT l.affiliate_id FROM public.affiliates l
                WHERE l.affiliate_id = ANY (missing) AND l.parent_affiliate_id IS NOT NULL
                  AND NOT EXISTS (SELECT 1 FROM public.affiliates lp
                                  WHERE lp.affiliate_id = l.parent_affiliate_id)
                  AND NOT EXISTS (SELECT 1 FROM affiliates_optimized vp
                                  WHERE vp.affiliate_id = l.parent_affiliate_id));
        END IF;
        WITH RECURSIVE m AS (
            SELECT l.* FROM public.affiliates l WHERE l.affiliate_id = ANY (missing)
        ), ordered (affiliate_id, depth) AS (
            SELECT m.affiliate_id, 0 FROM m
            WHERE m.parent_affiliate_id IS NULL
               OR NOT EXISTS (SELECT 1 FROM m p WHERE p.affiliate_id = m.parent_affiliate_id)
            UNION ALL
            SELECT c.affiliate_id, o.depth + 1
            FROM ordered o JOIN m c ON c.parent_affiliate_id = o.affiliate_id
        )
        INSERT INTO affiliates_optimized (
            affiliate_id, parent_affiliate_id, external_id, name, email, status,
            registration_date, total_deposits, total_bets, total_withdrawals,
            total_cpa_earned, total_rev_earned, total_commissions_paid, created_at, updated_at,
            hierarchy_path, hierarchy_level)
        SELECT m.affiliate_id,
               CASE WHEN p_detach_dangling AND m.affiliate_id = ANY (dangling) THEN NULL
                    ELSE m.parent_affiliate_id END,
               m.external_id, m.name, m.email, m.status,
               m.registration_date, m.total_deposits, m.total_bets, m.total_withdrawals,
               m.total_cpa_earned, m.total_rev_earned, m.total_commissions_paid, m.created_at,
               m.updated_at,
               m.affiliate_id::TEXT::LTREE, 1   -- placeholders: v2's insert trigger sets both
        FROM m LEFT JOIN ordered o USING (affiliate_id)
        ORDER BY o.depth NULLS LAST, m.affiliate_id;
        IF p_detach_dangling AND cardinality(dangling) > 0 THEN
            INSERT INTO detached_affiliates (affiliate_id, former_parent_id)
            SELECT l.affiliate_id, l.parent_affiliate_id FROM public.affiliates l
            WHERE l.affiliate_id = ANY (dangling)
            ON CONFLICT (affiliate_id) DO UPDATE SET former_parent_id = EXCLUDED.former_parent_id;
        END IF;
    END IF;

    -- A child v2 detached from a deleted parent stays a root while legacy still points at
    -- that parent (verify and repair expect it).
    UPDATE affiliates_optimized v SET
        parent_affiliate_id = s.want_parent,
        external_id = s.external_id, name = s.name, email = s.email, status = s.status,
        registration_date = s.registration_date, total_deposits = s.total_deposits,
        total_bets = s.total_bets, total_withdrawals = s.total_withdrawals,
        total_cpa_earned = s.total_cpa_earned, total_rev_earned = s.total_rev_earned,
        total_commissions_paid = s.total_commissions_paid, created_at = s.created_at,
        updated_at = s.updated_at
    FROM (
        SELECT l.*, CASE
            WHEN cur.parent_affiliate_id IS NULL AND l.parent_affiliate_id IS NOT NULL AND EXISTS (
                SELECT 1 FROM detached_affiliates d
                WHERE d.affiliate_id = l.affiliate_id
                  AND d.former_parent_id = l.parent_affiliate_id)
            THEN NULL ELSE l.parent_affiliate_id END AS want_parent
        FROM public.affiliates l JOIN affiliates_optimized cur USING (affiliate_id)
        WHERE l.affiliate_id = ANY (p_keys) AND l.affiliate_id <> ALL (missing)
    ) s
    WHERE v.affiliate_id = s.affiliate_id
      AND (v.parent_affiliate_id, v.external_id, v.name, v.email, v.status,
           v.registration_date, v.total_deposits, v.total_bets, v.total_withdrawals,
           v.total_cpa_earned, v.total_rev_earned, v.total_commissions_paid,
           v.created_at, v.updated_at)
          IS DISTINCT FROM
          (s.want_parent, s.external_id, s.name, s.email, s.status,
           s.registration_date, s.total_deposits, s.total_bets, s.total_withdrawals,
           s.total_cpa_earned, s.total_rev_earned, s.total_commissions_paid,
           s.created_at, s.updated_at);

    IF cardinality(structural) > 0 THEN
        -- v2's parent key is deferred: checked here, where a failure can still be
        -- contained (only inserts and moves queue such checks).
        SET CONSTRAINTS fature_v2.fk_parent_affiliate IMMEDIATE;
        SET CONSTRAINTS fature_v2.fk_parent_affiliate DEFERRED;
    END IF;
END;
$$;

-- Keys written before a backfill has completed. Until it ends the backfill owns v2 (its bulk phases
-- build paths, the closure and the counters from one plan), so dual-write hands it the keys
-- instead of syncing them, and the backfill syncs them itself when its bulk work is done:
-- a live write is never overwritten by an older copy, and never races the bulk phases.
CREATE TABLE cutover.backfill_catchup (
    affiliate_id BIGINT PRIMARY KEY
);

-- Until a backfill has completed, v2 is not legacy's yet: writes are handed to the backfill
-- (before it starts as while it runs), which copies legacy as of one snapshot and then
-- replays them.
CREATE FUNCTION cutover.backfill_running()
RETURNS BOOLEAN
LANGUAGE sql STABLE
AS $$
    SELECT NOT EXISTS (SELECT 1 FROM cutover.backfill_progress WHERE phase = 'done')
$$;

-- v2 := legacy for these keys, isolated: in one pass, or, if that fails, key by key
-- (parents first), each in its own subtransaction; every key that still fails is recorded in
-- cutover.write_divergences (with the query type queued for it by transaction p_txid, if
-- any), unless the backfill quarantined it. Returns the keys that failed. Never raises.
CREATE FUNCTION cutover.sync_isolated(p_keys BIGINT[], p_txid BIGINT, p_detach_dangling BOOLEAN DEFAULT false)
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
                    FROM pg_temp.cutover_pending_mirror p
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

-- After each write statement on legacy: its keys queued (and, for a strict query type,
-- synced at once, so that v2's error fails the statement itself).
CREATE FUNCTION cutover.queue_legacy_write()
RETURNS TRIGGER
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = fature_v2, public
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    me        BIGINT;
    qt        TEXT;
    keys      BIGINT[];
    took      BIGINT;
    prev_flag TEXT;
BEGIN
    -- (dual-write is on: the trigger's WHEN asked, just before)
    me := txid_current();
    qt := cutover.statement_query_type();
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
    SELECT me, k, qt, cutover.statement_fingerprint(), statement_timestamp(), took
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
    END IF;
    RETURN NULL;
END;
$$;

-- At COMMIT (deferred): every queued key of the transaction synced (sync_isolated: failures
-- recorded for repair, the COMMIT goes on), or handed to a running backfill.
CREATE FUNCTION cutover.mirror_at_commit()
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
        keys := ARRAY(SELECT DISTINCT affiliate_id FROM pg_temp.cutover_pending_mirror WHERE txid = me);
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
            FROM pg_temp.cutover_pending_mirror p WHERE p.txid = me;
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
                                                    FROM pg_temp.cutover_pending_mirror
                                                    WHERE txid = me AND query_type = p.query_type) s
                   )::BIGINT AS legacy_us
            FROM pg_temp.cutover_pending_mirror p
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

    DELETE FROM pg_temp.cutover_pending_mirror WHERE txid = me;
    DELETE FROM pg_temp.cutover_pending_mirror_tx WHERE txid = me;
    RETURN NULL;
END;
$$;

-- TRUNCATE: v2's affiliates go too (their closure and detached records with them), in one
-- set-based pass (the per-row hierarchy upkeep is pointless when every row goes). v2 data
-- that references them (transactions, commissions) is never cascaded away: then the
-- mirror fails, isolated, and the truncate is recorded for an operator to decide.
CREATE FUNCTION cutover.mirror_legacy_truncate()
RETURNS TRIGGER
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = fature_v2, public
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    qt        TEXT;
    started   TIMESTAMPTZ := clock_timestamp();
    prev_flag TEXT;
    e_state TEXT; e_message TEXT; e_constraint TEXT;
BEGIN
    -- (dual-write is on: the trigger's WHEN asked, just before)
    qt := cutover.statement_query_type();
    prev_flag := coalesce(current_setting('cutover.mirroring', true), '');
    BEGIN
        PERFORM set_config('cutover.mirroring', 'on', true);
        PERFORM set_config('cutover.truncating', 'on', true);
        DELETE FROM hierarchy_index;
        DELETE FROM detached_affiliates;
        DELETE FROM affiliates_optimized;
        PERFORM set_config('cutover.truncating', '', true);
        PERFORM set_config('cutover.mirroring', prev_flag, true);
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_message = MESSAGE_TEXT,
                                e_constraint = CONSTRAINT_NAME;
        IF cutover.dual_write_strict(qt) THEN
            PERFORM cutover.report_statement('CV002', 'legacy_to_target', qt, 0, started, clock_timestamp());
            RAISE;
        END IF;
        PERFORM cutover.mirror_failed('legacy_to_target', 'TRUNCATE', '{}', qt, 0, started,
                                      e_state, e_message, e_constraint);
        RETURN NULL;
    END;
    PERFORM cutover.report_statement('CV000', 'legacy_to_target', qt, 0, started, clock_timestamp());
    RETURN NULL;
END;
$$;

CREATE TRIGGER cutover_mirror_insert
    AFTER INSERT ON public.affiliates REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT WHEN (cutover.dual_write_active())
    EXECUTE FUNCTION cutover.queue_legacy_write();
CREATE TRIGGER cutover_mirror_update
    AFTER UPDATE ON public.affiliates REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT WHEN (cutover.dual_write_active())
    EXECUTE FUNCTION cutover.queue_legacy_write();
CREATE TRIGGER cutover_mirror_delete
    AFTER DELETE ON public.affiliates REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT WHEN (cutover.dual_write_active())
    EXECUTE FUNCTION cutover.queue_legacy_write();
CREATE TRIGGER cutover_mirror_truncate
    AFTER TRUNCATE ON public.affiliates
    FOR EACH STATEMENT WHEN (cutover.dual_write_active())
    EXECUTE FUNCTION cutover.mirror_legacy_truncate();

-- The per-row hierarchy upkeep of deletes is skipped while a truncate is mirrored (and in
-- 0007's release_deleted_affiliate()).
CREATE OR REPLACE FUNCTION fature_v2.record_detached_children()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    IF current_setting('cutover.truncating', true) = 'on' THEN
        RETURN OLD;
    END IF;
    INSERT INTO detached_affiliates (affiliate_id, former_parent_id)
    SELECT affiliate_id, OLD.affiliate_id
    FROM affiliates_optimized
    WHERE parent_affiliate_id = OLD.affiliate_id
    ON CONFLICT (affiliate_id) DO UPDATE
        SET former_parent_id = EXCLUDED.former_parent_id,
            detached_at = EXCLUDED.detached_at;
    RETURN OLD;
END;
$$;


-- ---------------------------------------------------------------------------------------
-- v2 → legacy (reversal: from stage target on, the proxy writes v2 first)
-- ---------------------------------------------------------------------------------------

-- Legacy gets v2's rows (inserted and updated ones upserted, deleted ones deleted),
-- level_1_referrals from v2's maintained count (v2 is the truth now). One function for the
-- three triggers: PL/pgSQL compiles it per trigger and plans only the branch that runs, so
-- each reads the one transition table its trigger has. v2's own upkeep statements (a parent's counters, a moved subtree's paths) fire this
-- too and bring legacy's counters along.
CREATE FUNCTION cutover.mirror_target()
RETURNS TRIGGER
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = fature_v2, public
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    qt        TEXT;
    started   TIMESTAMPTZ := clock_timestamp();
    keys      BIGINT[];
    n         BIGINT;
    prev_flag TEXT;
    e_state TEXT; e_message TEXT; e_constraint TEXT;
BEGIN
    -- (dual-write is on: the trigger's WHEN asked, just before)
    qt := cutover.statement_query_type();
    IF TG_OP = 'DELETE' THEN
        SELECT array_agg(affiliate_id), count(*) INTO keys, n FROM old_rows;
    ELSE
        SELECT array_agg(affiliate_id), count(*) INTO keys, n FROM new_rows;
    END IF;
    IF n = 0 THEN
        RETURN NULL;
    END IF;
    prev_flag := coalesce(current_setting('cutover.mirroring', true), '');
    BEGIN
        PERFORM set_config('cutover.mirroring', 'on', true);
        IF TG_OP = 'DELETE' THEN
            DELETE FROM public.affiliates WHERE affiliate_id = ANY (keys);
        ELSE
            INSERT INTO public.affiliates AS l (
                affiliate_id, parent_affiliate_id, external_id, name, email, status,
                registration_date, level_1_referrals, total_deposits, total_bets,
                total_withdrawals, total_cpa_earned, total_rev_earned, total_commissions_paid,
                created_at, updated_at)
            SELECT n.affiliate_id, n.parent_affiliate_id, n.external_id, n.name, n.email, n.status,
                   n.registration_date, n.direct_referrals_count, n.total_deposits, n.total_bets,
                   n.total_withdrawals, n.total_cpa_earned, n.total_rev_earned,
                   n.total_commissions_paid, n.created_at, n.updated_at
            FROM new_rows n
            ORDER BY n.affiliate_id
            ON CONFLICT (affiliate_id) DO UPDATE SET
                parent_affiliate_id = EXCLUDED.parent_affiliate_id,
                external_id = EXCLUDED.external_id, name = EXCLUDED.name, email = EXCLUDED.email,
                status = EXCLUDED.status, registration_date = EXCLUDED.registration_date,
                level_1_referrals = EXCLUDED.level_1_referrals,
                total_deposits = EXCLUDED.total_deposits, total_bets = EXCLUDED.total_bets,
                total_withdrawals = EXCLUDED.total_withdrawals,
                total_cpa_earned = EXCLUDED.total_cpa_earned,
                total_rev_earned = EXCLUDED.total_rev_earned,
                total_commissions_paid = EXCLUDED.total_commissions_paid,
                created_at = EXCLUDED.created_at, updated_at = EXCLUDED.updated_at
            WHERE (l.parent_affiliate_id, l.external_id, l.name, l.email, l.status,
                   l.registration_date, l.level_1_referrals, l.total_deposits, l.total_bets,
                   l.total_withdrawals, l.total_cpa_earned, l.total_rev_earned,
                   l.total_commissions_paid, l.created_at, l.updated_at)
                  IS DISTINCT FROM
                  (EXCLUDED.parent_affiliate_id, EXCLUDED.external_id, EXCLUDED.name,
                   EXCLUDED.email, EXCLUDED.status, EXCLUDED.registration_date,
                   EXCLUDED.level_1_referrals, EXCLUDED.total_deposits, EXCLUDED.total_bets,
                   EXCLUDED.total_withdrawals, EXCLUDED.total_cpa_earned,
                   EXCLUDED.total_rev_earned, EXCLUDED.total_commissions_paid,
                   EXCLUDED.created_at, EXCLUDED.updated_at);
        END IF;
        PERFORM set_config('cutover.mirroring', prev_flag, true);
    EXCEPTION WHEN OTHERS THEN
        GET STACKED DIAGNOSTICS e_state = RETURNED_SQLSTATE, e_message = MESSAGE_TEXT,
                                e_constraint = CONSTRAINT_NAME;
        IF cutover.dual_write_strict(qt) THEN
            PERFORM cutover.report_statement('CV002', 'target_to_legacy', qt, n, started, clock_timestamp());
            RAISE;
        END IF;
        PERFORM cutover.mirror_failed('target_to_legacy', TG_OP, keys, qt, n, started,
                                      e_state, e_message, e_constraint);
        RETURN NULL;
    END;
    -- v2's own upkeep statements are not the client's: only the statement itself reports.
    IF pg_trigger_depth() = 1 THEN
        PERFORM cutover.report_statement('CV000', 'target_to_legacy', qt, n, started, clock_timestamp());
    END IF;
    RETURN NULL;
END;
$$;


CREATE TRIGGER cutover_mirror_insert
    AFTER INSERT ON fature_v2.affiliates_optimized REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT WHEN (cutover.dual_write_active())
    EXECUTE FUNCTION cutover.mirror_target();
CREATE TRIGGER cutover_mirror_update
    AFTER UPDATE ON fature_v2.affiliates_optimized
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT WHEN (cutover.dual_write_active())
    EXECUTE FUNCTION cutover.mirror_target();
CREATE TRIGGER cutover_mirror_delete
    AFTER DELETE ON fature_v2.affiliates_optimized REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT WHEN (cutover.dual_write_active())
    EXECUTE FUNCTION cutover.mirror_target();
