-- Dual-write's fixed cost per statement and per COMMIT, trimmed (issue 16; numbers in
-- docs/performance.md, "Dual-write"). Same behaviour.
--
-- sync_to_target: a sync where no key changes its place in the tree (a deposit, a status,
-- a counter: most writes) takes a path of its own, one UPDATE of legacy's columns joined by
-- key. The general path's update also joins v2's current row and asks detached_affiliates
-- for the parent, a plan three times the size, started at every COMMIT; it also cleans the
-- quarantine, which only a key gone from legacy can need. A single key takes no separate
-- lock (its UPDATE takes it).

-- 0017's, with the common case apart.
CREATE OR REPLACE FUNCTION cutover.sync_to_target(p_keys BIGINT[], p_detach_dangling BOOLEAN DEFAULT false)
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

    -- The common case, apart (0026): no key changes its place in the tree, so every key is
    -- on both sides and keeps its v2 parent (the same as legacy's, or NULL where v2 detached
    -- it from a deleted one). Nothing to delete, insert, quarantine or check; the update
    -- leaves the parent alone. One key needs no lock of its own: the UPDATE takes it.
    IF cardinality(structural) = 0 THEN
        IF cardinality(p_keys) > 1 THEN
            PERFORM 1 FROM affiliates_optimized
            WHERE affiliate_id = ANY (p_keys)
            ORDER BY affiliate_id
            FOR NO KEY UPDATE;
        END IF;
        UPDATE affiliates_optimized v SET
            external_id = l.external_id, name = l.name, email = l.email, status = l.status,
            registration_date = l.registration_date, total_deposits = l.total_deposits,
            total_bets = l.total_bets, total_withdrawals = l.total_withdrawals,
            total_cpa_earned = l.total_cpa_earned, total_rev_earned = l.total_rev_earned,
            total_commissions_paid = l.total_commissions_paid, created_at = l.created_at,
            updated_at = l.updated_at, legacy_level_1_referrals = l.level_1_referrals
        FROM public.affiliates l
        WHERE v.affiliate_id = ANY (p_keys) AND l.affiliate_id = v.affiliate_id
          AND (v.external_id, v.name, v.email, v.status,
               v.registration_date, v.total_deposits, v.total_bets, v.total_withdrawals,
               v.total_cpa_earned, v.total_rev_earned, v.total_commissions_paid,
               v.created_at, v.updated_at, v.legacy_level_1_referrals)
              IS DISTINCT FROM
              (l.external_id, l.name, l.email, l.status,
               l.registration_date, l.total_deposits, l.total_bets, l.total_withdrawals,
               l.total_cpa_earned, l.total_rev_earned, l.total_commissions_paid,
               l.created_at, l.updated_at, l.level_1_referrals);
        RETURN;
    END IF;

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
    IF structural <@ missing THEN
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

    -- v2's parent key is deferred: checked here, where a failure can still be contained
    -- (only inserts and moves queue such checks, and the common case above has neither).
    SET CONSTRAINTS fature_v2.fk_parent_affiliate IMMEDIATE;
    SET CONSTRAINTS fature_v2.fk_parent_affiliate DEFERRED;
END;
$$;
