-- One write side per transaction, and a way back that is exact (docs/routing.md, "One
-- transaction, one write side"; docs/dual-write.md, "Reversal").
--
-- 1. Legacy's own counter travels with v2. `level_1_referrals` is derived in v2
--    (`direct_referrals_count`, maintained by trigger), but legacy's value is the
--    application's own (incremented by the app, drifted in places). From `target` on, legacy
--    is written by the reverse mirror, which must give it what legacy alone would have: so v2
--    carries legacy's value in `legacy_level_1_referrals` (never read by the application,
--    which reads v2's true count), kept by the forward sync, written by the app's own
--    statements served from v2 (the rewrite maps a write of the derived column there), and
--    copied back by the reverse mirror. v2's own upkeep (a parent's count) no longer reaches
--    legacy's counter: the reverse mirror used to copy v2's count over it, and the app's own
--    increment then counted the child a second time.
--
-- 2. A legacy-served write inside a transaction that has already written v2 first is synced
--    at once. The proxy keeps a transaction's writes on one side; the one exception is a
--    statement v2 cannot serve (its route check not in yet, a statement the rewrite refuses)
--    arriving after the transaction has written v2 first. It is served by legacy, and v2 —
--    the authoritative side in that transaction — gets its rows before the next statement
--    (queued until COMMIT, they would be missing from v2 for the transaction's later
--    v2-first statements, whose reverse mirror then wrote the stale row back over legacy:
--    the lost deposit of issue 15). The reverse mirror marks the transaction
--    (`cutover.v2_first`, transaction-local, undone with a rolled-back savepoint).

-- Legacy's own default (0) for rows the application inserts without it.
ALTER TABLE fature_v2.affiliates_optimized ADD COLUMN legacy_level_1_referrals INTEGER DEFAULT 0;
COMMENT ON COLUMN fature_v2.affiliates_optimized.legacy_level_1_referrals IS
    'legacy''s own level_1_referrals (the application''s counter), carried for the way back; v2''s true count is direct_referrals_count';

-- v2 := legacy's counter for these keys (all keys when NULL). Touches only rows that differ.
CREATE FUNCTION cutover.carry_legacy_counters(p_keys BIGINT[])
RETURNS VOID
LANGUAGE plpgsql
SET search_path = fature_v2, public
SET plan_cache_mode = force_generic_plan
AS $$
DECLARE
    prev_flag TEXT := coalesce(current_setting('cutover.mirroring', true), '');
BEGIN
    PERFORM set_config('cutover.mirroring', 'on', true);
    IF p_keys IS NULL THEN
        UPDATE affiliates_optimized v SET legacy_level_1_referrals = l.level_1_referrals
        FROM public.affiliates l
        WHERE l.affiliate_id = v.affiliate_id
          AND v.legacy_level_1_referrals IS DISTINCT FROM l.level_1_referrals;
    ELSE
        UPDATE affiliates_optimized v SET legacy_level_1_referrals = l.level_1_referrals
        FROM public.affiliates l
        WHERE v.affiliate_id = ANY (p_keys) AND l.affiliate_id = v.affiliate_id
          AND v.legacy_level_1_referrals IS DISTINCT FROM l.level_1_referrals;
    END IF;
    PERFORM set_config('cutover.mirroring', prev_flag, true);
END;
$$;

SELECT cutover.carry_legacy_counters(NULL);

-- The forward sync carries the counter too: the rows' sync is 0006's, renamed; every caller
-- (the COMMIT sync, strict statements, the backfill's catch-up) calls it by this name.
ALTER FUNCTION cutover.sync_to_target(BIGINT[], BOOLEAN) RENAME TO sync_rows_to_target;
CREATE FUNCTION cutover.sync_to_target(p_keys BIGINT[], p_detach_dangling BOOLEAN DEFAULT false)
RETURNS VOID
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    PERFORM cutover.sync_rows_to_target(p_keys, p_detach_dangling);
    PERFORM cutover.carry_legacy_counters(p_keys);
END;
$$;

-- Whether the running transaction has written v2 first (set by the reverse mirror).
CREATE FUNCTION cutover.wrote_v2_first()
RETURNS BOOLEAN
LANGUAGE sql STABLE
AS $$
    SELECT coalesce(current_setting('cutover.v2_first', true), '') = 'on'
$$;

-- 0006's queue_legacy_write, plus: in a transaction that has written v2 first, the keys are
-- synced at once (isolated: a failure is recorded, the statement goes on).
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
    keys      BIGINT[];
    took      BIGINT;
    prev_flag TEXT;
    started   TIMESTAMPTZ;
    failed    BIGINT[];
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

-- 0006's mirror_target, with legacy's counter from the carried column (never from v2's
-- count), and the transaction marked as having written v2 first.
CREATE OR REPLACE FUNCTION cutover.mirror_target()
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
    -- (the reverse mirror is on: the trigger's WHEN asked, just before)
    qt := cutover.statement_query_type();
    IF TG_OP = 'DELETE' THEN
        SELECT array_agg(affiliate_id), count(*) INTO keys, n FROM old_rows;
    ELSE
        SELECT array_agg(affiliate_id), count(*) INTO keys, n FROM new_rows;
    END IF;
    IF n = 0 THEN
        RETURN NULL;
    END IF;
    PERFORM set_config('cutover.v2_first', 'on', true);
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
                   n.registration_date, n.legacy_level_1_referrals, n.total_deposits,
                   n.total_bets, n.total_withdrawals, n.total_cpa_earned, n.total_rev_earned,
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
