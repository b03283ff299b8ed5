-- Network sizes as deltas: no row every writer must lock (issue 16; docs/seed-sql-changes.md,
-- "Network sizes"; docs/performance.md, "Dual-write").
--
-- The seed keeps `total_network_size` on every ancestor up to the root, updated by every
-- insert, move and delete below it: every writer under one root updated the root's row and
-- held its lock until commit, so writers under one root ran one at a time, and each insert
-- rewrote a whole row (non-HOT, an entry in every index) per ancestor. Here a change to the
-- size of a subtree appends one narrow row per ancestor to `network_size_deltas` (inserts
-- never wait for each other), and a fold adds the deltas into the rows in short batches,
-- deleting them in the same statement. At every snapshot:
--
--     true network size = total_network_size + sum(pending deltas of the row)
--
-- which `fature_v2.affiliate_network_sizes` (a view) and `fature_v2.network_size(id)` give.
-- The column alone lags by what is not folded yet (the fold runs every 250 ms inside
-- `cutover serve`; `SELECT fature_v2.fold_network_sizes()` runs it by hand or from cron).
-- `direct_referrals_count` stays a direct update of the parent: the application's own
-- `bump_parent_referrals` locks the same parent in legacy, so it adds no wait legacy does not
-- have.
--
-- With ancestors no longer written, dual-write's sync locks only what it writes: the keys,
-- the old and new parents of a row that moves, and the subtree of a row that moves or goes
-- (cutover.sync_to_target below, otherwise 0006's, with 0014's carried counter in the same
-- statements). And a move locks the subtree it counts, an insert the parent it hangs under,
-- so that a row added under a subtree while it moves is counted on the right side.
--
-- fillfactor 85: room on each page for a new version of its rows, so that an update that
-- changes no indexed column (a deposit, a fold, the carried legacy counter) is HOT — no
-- entry in any of the table's nine indexes. It applies to pages written from now on: a
-- backfill writes every row after this migration.

CREATE TABLE fature_v2.network_size_deltas (
    affiliate_id BIGINT NOT NULL,
    delta        INTEGER NOT NULL
);
CREATE INDEX network_size_deltas_affiliate ON fature_v2.network_size_deltas (affiliate_id);
COMMENT ON TABLE fature_v2.network_size_deltas IS
    'changes of total_network_size not folded into affiliates_optimized yet: the true size is the column plus the pending deltas (fature_v2.affiliate_network_sizes)';

ALTER TABLE fature_v2.affiliates_optimized SET (fillfactor = 85);

-- The exact network size of one affiliate (NULL when it is not in v2).
CREATE FUNCTION fature_v2.network_size(p_affiliate_id BIGINT)
RETURNS INTEGER
LANGUAGE sql STABLE
SET search_path = fature_v2, public
AS $$
    SELECT a.total_network_size
           + coalesce((SELECT sum(d.delta) FROM network_size_deltas d
                       WHERE d.affiliate_id = a.affiliate_id), 0)::INTEGER
    FROM affiliates_optimized a WHERE a.affiliate_id = p_affiliate_id
$$;

-- The exact network size of every affiliate.
CREATE VIEW fature_v2.affiliate_network_sizes AS
SELECT a.affiliate_id,
       a.total_network_size + coalesce(d.pending, 0)::INTEGER AS total_network_size
FROM fature_v2.affiliates_optimized a
LEFT JOIN (SELECT affiliate_id, sum(delta) AS pending
           FROM fature_v2.network_size_deltas GROUP BY affiliate_id) d
       USING (affiliate_id);

-- Folds the pending deltas of up to p_rows affiliates into their rows; returns how many
-- affiliates it folded. One statement: the deltas leave and the rows change together, so no
-- snapshot ever sees a delta twice or not at all. One fold at a time (another one running:
-- returns 0 at once), and rows locked by a writer are left for the next fold (SKIP LOCKED).
-- (0021 replaces it: by index, and giving up any other wait.) All of a row's visible deltas are folded at
-- once, so the column never leaves 0..size. SECURITY DEFINER (owned by the role that
-- migrates): cutover serve calls it with the shadow's role, which may only read.
CREATE FUNCTION fature_v2.fold_network_sizes(p_rows INTEGER DEFAULT 10000)
RETURNS INTEGER
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = fature_v2, public
AS $$
DECLARE
    folded INTEGER;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('fature_v2.fold_network_sizes')) THEN
        RETURN 0;
    END IF;
    WITH candidates AS (
        SELECT DISTINCT affiliate_id FROM network_size_deltas LIMIT p_rows
    ), mine AS (
        SELECT a.affiliate_id FROM affiliates_optimized a
        WHERE a.affiliate_id IN (SELECT affiliate_id FROM candidates)
        FOR NO KEY UPDATE SKIP LOCKED
    ), taken AS (
        -- The deltas of a row that is gone (its delete committed) go too.
        DELETE FROM network_size_deltas d
        WHERE d.affiliate_id IN (SELECT affiliate_id FROM mine)
           OR (d.affiliate_id IN (SELECT affiliate_id FROM candidates)
               AND NOT EXISTS (SELECT 1 FROM affiliates_optimized a
                               WHERE a.affiliate_id = d.affiliate_id))
        RETURNING d.affiliate_id, d.delta
    ), sums AS (
        SELECT affiliate_id, sum(delta)::INTEGER AS delta FROM taken GROUP BY affiliate_id
    ), applied AS (
        UPDATE affiliates_optimized a SET total_network_size = a.total_network_size + s.delta
        FROM sums s
        WHERE a.affiliate_id = s.affiliate_id AND s.delta <> 0
        RETURNING 1
    )
    SELECT count(*) INTO folded FROM sums;
    RETURN folded;
END;
$$;

-- Folds everything pending (each call a batch); for the offline commands and tests.
CREATE FUNCTION fature_v2.fold_all_network_sizes()
RETURNS BIGINT
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
DECLARE
    total BIGINT := 0;
    n     INTEGER;
BEGIN
    LOOP
        n := fold_network_sizes(10000);
        total := total + n;
        EXIT WHEN n = 0;
    END LOOP;
    RETURN total;
END;
$$;

-- AFTER INSERT: closure rows, the ancestors' sizes (deltas), the parent's count.
CREATE OR REPLACE FUNCTION fature_v2.update_referral_counters()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    IF NEW.parent_affiliate_id IS NULL OR current_setting('cutover.bulk_load', true) = 'on' THEN
        RETURN NULL;
    END IF;

    -- The row's closure pairs and its ancestors' deltas, from its path, in one statement.
    -- A plain INSERT: a new affiliate has no pairs yet (a deleted one's went with it).
    WITH ancestors AS (
        SELECT t.label::BIGINT AS ancestor_id, nlevel(NEW.hierarchy_path) - t.ord::INTEGER AS distance
        FROM unnest(string_to_array(NEW.hierarchy_path::TEXT, '.')) WITH ORDINALITY AS t(label, ord)
        WHERE t.ord < nlevel(NEW.hierarchy_path)
    ), pairs AS (
        INSERT INTO hierarchy_index (ancestor_id, descendant_id, level_distance)
        SELECT ancestor_id, NEW.affiliate_id, distance FROM ancestors
    )
    INSERT INTO network_size_deltas (affiliate_id, delta)
    SELECT ancestor_id, 1 FROM ancestors;

    UPDATE affiliates_optimized
    SET direct_referrals_count = direct_referrals_count + 1
    WHERE affiliate_id = NEW.parent_affiliate_id;

    RETURN NULL;
END;
$$;

-- AFTER DELETE: the row leaves its parent's count and its ancestors' sizes (ancestors from
-- its last path: its closure pairs may already be gone, CASCADE); its own pending deltas go.
CREATE OR REPLACE FUNCTION fature_v2.release_deleted_affiliate()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    IF current_setting('cutover.truncating', true) = 'on' THEN
        RETURN NULL;
    END IF;

    DELETE FROM network_size_deltas WHERE affiliate_id = OLD.affiliate_id;

    IF OLD.parent_affiliate_id IS NULL THEN
        RETURN NULL;
    END IF;

    UPDATE affiliates_optimized
    SET direct_referrals_count = direct_referrals_count - 1
    WHERE affiliate_id = OLD.parent_affiliate_id;

    INSERT INTO network_size_deltas (affiliate_id, delta)
    SELECT t.label::BIGINT, -1
    FROM unnest(string_to_array(OLD.hierarchy_path::TEXT, '.')) WITH ORDINALITY AS t(label, ord)
    WHERE t.ord < nlevel(OLD.hierarchy_path);

    RETURN NULL;
END;
$$;

-- AFTER UPDATE of the parent: 0007's subtree move, with the ancestors' sizes as deltas.
-- The path and level a child of p_parent gets (0002's), the parent locked: its row is about
-- to be updated anyway (direct_referrals_count), and locking it first means the path is read
-- from its latest version — a subtree move that committed while we waited has moved it.
-- Without the lock, a child inserted during a move of one of its ancestors took the path and
-- closure rows from before the move.
CREATE OR REPLACE FUNCTION fature_v2.child_position(
    p_parent BIGINT, p_child BIGINT, OUT path LTREE, OUT level INTEGER
)
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    IF p_parent IS NULL THEN
        path := p_child::TEXT::LTREE;
        level := 1;
        RETURN;
    END IF;

    SELECT hierarchy_path || p_child::TEXT, hierarchy_level + 1 INTO path, level
    FROM affiliates_optimized
    WHERE affiliate_id = p_parent
    FOR NO KEY UPDATE;

    IF NOT FOUND THEN
        RAISE EXCEPTION 'parent affiliate % of affiliate % is not in fature_v2.affiliates_optimized',
                p_parent, p_child
            USING ERRCODE = 'foreign_key_violation',
                  CONSTRAINT = 'fk_parent_affiliate',
                  HINT = 'Insert parents before their children.';
    END IF;
END;
$$;


CREATE OR REPLACE FUNCTION fature_v2.move_subtree()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
DECLARE
    node         BIGINT := NEW.affiliate_id;
    new_parent   BIGINT := NEW.parent_affiliate_id;
    node_label   LTREE := NEW.affiliate_id::TEXT::LTREE;
    below        BIGINT[];
    subtree      BIGINT[];
    old_anc      BIGINT[];
    new_path     LTREE;
    locked       BIGINT[] := '{}';
    more         BIGINT[];
BEGIN
    -- The subtree is locked before it is counted. A writer that adds or removes a row below
    -- the node holds that row's parent (its direct_referrals_count, child_position's lock)
    -- until it commits: once every row of the subtree is ours, no one can change its size;
    -- a row that joined while we waited is locked in the next round. (Without this, a child
    -- inserted below during the move was counted under the old ancestors and not the new.)
    LOOP
        more := ARRAY(SELECT h.descendant_id FROM hierarchy_index h
                      WHERE h.ancestor_id = node AND h.descendant_id <> ALL (locked));
        EXIT WHEN cardinality(more) = 0;
        PERFORM 1 FROM affiliates_optimized
        WHERE affiliate_id = ANY (more)
        ORDER BY affiliate_id
        FOR NO KEY UPDATE;
        locked := locked || more;
    END LOOP;

    -- Descendants that still exist (a DELETE of several rows may have removed some).
    below := ARRAY(
        SELECT h.descendant_id
        FROM hierarchy_index h
        JOIN affiliates_optimized d ON d.affiliate_id = h.descendant_id
        WHERE h.ancestor_id = node
    );
    subtree := below || node;

    IF new_parent = ANY (subtree) THEN
        PERFORM refuse_cycle(node, new_parent);
    END IF;

    -- Leave the old ancestors.
    old_anc := ARRAY(SELECT ancestor_id FROM hierarchy_index WHERE descendant_id = node);

    INSERT INTO network_size_deltas (affiliate_id, delta)
    SELECT unnest(old_anc), -cardinality(subtree);

    DELETE FROM hierarchy_index
    WHERE ancestor_id = ANY (old_anc) AND descendant_id = ANY (subtree);

    IF OLD.parent_affiliate_id IS NOT NULL THEN
        UPDATE affiliates_optimized
        SET direct_referrals_count = direct_referrals_count - 1
        WHERE affiliate_id = OLD.parent_affiliate_id;
    END IF;

    -- Paths and levels of the subtree, re-rooted at the node's new path.
    SELECT path INTO new_path FROM child_position(new_parent, node);

    UPDATE affiliates_optimized d
    SET hierarchy_path = CASE WHEN d.affiliate_id = node THEN new_path
                              ELSE new_path || subpath(d.hierarchy_path, index(d.hierarchy_path, node_label) + 1)
                         END,
        hierarchy_level = CASE WHEN d.affiliate_id = node THEN nlevel(new_path)
                               ELSE nlevel(new_path) + nlevel(d.hierarchy_path)
                                    - index(d.hierarchy_path, node_label) - 1
                          END
    WHERE d.affiliate_id = ANY (subtree);

    IF new_parent IS NULL THEN
        RETURN NULL;
    END IF;

    -- A detached child given a parent again is no longer detached.
    DELETE FROM detached_affiliates WHERE affiliate_id = node;

    -- Join the new ancestors.
    UPDATE affiliates_optimized
    SET direct_referrals_count = direct_referrals_count + 1
    WHERE affiliate_id = new_parent;

    INSERT INTO hierarchy_index (ancestor_id, descendant_id, level_distance)
    SELECT a.ancestor_id, s.descendant_id, a.distance + 1 + s.distance
    FROM (
        SELECT ancestor_id, level_distance AS distance
        FROM hierarchy_index WHERE descendant_id = new_parent
        UNION ALL
        SELECT new_parent, 0
    ) a
    CROSS JOIN (
        SELECT h.descendant_id, h.level_distance AS distance
        FROM hierarchy_index h WHERE h.ancestor_id = node AND h.descendant_id = ANY (below)
        UNION ALL
        SELECT node, 0
    ) s
    ON CONFLICT (ancestor_id, descendant_id)
        DO UPDATE SET level_distance = EXCLUDED.level_distance;

    INSERT INTO network_size_deltas (affiliate_id, delta)
    SELECT new_parent, cardinality(subtree)
    UNION ALL
    SELECT ancestor_id, cardinality(subtree) FROM hierarchy_index WHERE descendant_id = new_parent;

    RETURN NULL;
END;
$$;

-- dual-write's sync: 0006's, locking only what it writes (see above), with 0014's carried
-- counter written by the same INSERT and UPDATE (0014 ran a second pass over the keys).
-- Every caller (the COMMIT sync, strict statements, the backfill's catch-up) calls it by
-- this name.
DROP FUNCTION cutover.sync_to_target(BIGINT[], BOOLEAN);
DROP FUNCTION cutover.sync_rows_to_target(BIGINT[], BOOLEAN);
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

    -- Row locks, up front and in key order, on what this sync and v2's triggers will write:
    -- the keys; for a row whose place in the tree changes, its old and new parent (their
    -- direct_referrals_count) and its subtree (paths and levels). Ancestors further up are
    -- not locked: their network sizes change by deltas, which lock nothing (0017). FOR NO KEY
    -- UPDATE, as the updates themselves take, so that a concurrent insert's foreign-key
    -- checks (FOR KEY SHARE on every ancestor of its row) and this sync never wait for each
    -- other; a row the sync deletes is taken FOR UPDATE by the DELETE itself. (Locking the
    -- whole set FOR UPDATE when a row went made a deleted row's parent wait for every
    -- insert below it, and deadlock with them: 40P01 in tests/network_sizes.rs.) Two
    -- transactions whose moves could make a cycle together always share a locked row (the
    -- one's new parent is in the other's subtree), so they run one after the other and the
    -- second sees the first's closure.
    IF cardinality(structural) = 0 THEN
        PERFORM 1 FROM affiliates_optimized
        WHERE affiliate_id = ANY (p_keys)
        ORDER BY affiliate_id
        FOR NO KEY UPDATE;
    ELSIF structural <@ missing THEN
        -- Only new rows change the tree: the keys and the parents they hang under (a new
        -- row has no subtree in v2 yet), in one statement.
        PERFORM 1 FROM affiliates_optimized
        WHERE affiliate_id = ANY (p_keys || ARRAY(
            SELECT l.parent_affiliate_id FROM public.affiliates l
            WHERE l.affiliate_id = ANY (missing) AND l.parent_affiliate_id IS NOT NULL))
        ORDER BY affiliate_id
        FOR NO KEY UPDATE;
    ELSE
        LOOP
            more := ARRAY(
                SELECT id FROM (
                    SELECT unnest(p_keys) AS id
                    UNION
                    SELECT v.parent_affiliate_id FROM affiliates_optimized v
                    WHERE v.affiliate_id = ANY (structural)
                    UNION
                    SELECT l.parent_affiliate_id FROM public.affiliates l
                    WHERE l.affiliate_id = ANY (structural)
                    UNION
                    SELECT h.descendant_id FROM hierarchy_index h WHERE h.ancestor_id = ANY (structural)
                ) s
                WHERE id IS NOT NULL AND id <> ALL (locked)
            );
            EXIT WHEN cardinality(more) = 0;
            PERFORM 1 FROM affiliates_optimized
            WHERE affiliate_id = ANY (more)
            ORDER BY affiliate_id
            FOR NO KEY UPDATE;
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
            legacy_level_1_referrals, hierarchy_path, hierarchy_level)
        SELECT m.affiliate_id,
               CASE WHEN p_detach_dangling AND m.affiliate_id = ANY (dangling) THEN NULL
                    ELSE m.parent_affiliate_id END,
               m.external_id, m.name, m.email, m.status,
               m.registration_date, m.total_deposits, m.total_bets, m.total_withdrawals,
               m.total_cpa_earned, m.total_rev_earned, m.total_commissions_paid, m.created_at,
               m.updated_at, m.level_1_referrals,
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
        updated_at = s.updated_at, legacy_level_1_referrals = s.level_1_referrals
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
           v.created_at, v.updated_at, v.legacy_level_1_referrals)
          IS DISTINCT FROM
          (s.want_parent, s.external_id, s.name, s.email, s.status,
           s.registration_date, s.total_deposits, s.total_bets, s.total_withdrawals,
           s.total_cpa_earned, s.total_rev_earned, s.total_commissions_paid,
           s.created_at, s.updated_at, s.level_1_referrals);

    IF cardinality(structural) > 0 THEN
        -- v2's parent key is deferred: checked here, where a failure can still be
        -- contained (only inserts and moves queue such checks).
        SET CONSTRAINTS fature_v2.fk_parent_affiliate IMMEDIATE;
        SET CONSTRAINTS fature_v2.fk_parent_affiliate DEFERRED;
    END IF;
END;
$$;
