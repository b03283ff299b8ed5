-- The reverse mirror (after the flip: v2 written first, legacy mirrored) copies only what
-- legacy can see (issue 16).
--
-- 0014's mirror_target upserted every row an UPDATE of v2 wrote. v2's own upkeep writes
-- many rows in columns legacy does not have: a parent's direct_referrals_count at each
-- insert, the paths and levels of a whole subtree at each move, the network sizes at each
-- fold. Each of those rows became an upsert into public.affiliates that changed nothing
-- (its WHERE compares every column) but locked the row until COMMIT, as ON CONFLICT DO
-- UPDATE locks the row it meets — a move of an affiliate with 10,000 below it locked
-- 10,001 legacy rows. Now an UPDATE's rows are paired by key with their old versions and
-- only those whose legacy columns changed are copied; an upkeep statement that changed none
-- returns at once (the client's own statements report as before). When the key itself
-- changed the rows cannot be paired, and all are copied as before. Inserts and deletes are
-- unchanged. (0027 kept the fold out by its setting; this covers every such write.)

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
    changed   BIGINT[];   -- an update's rows whose legacy columns changed (NULL: all)
    unpaired  BOOLEAN;    -- a new row without an old one of its key (a key changed)
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
    -- An update copies only the rows whose legacy columns it changed (0028). v2's upkeep
    -- changes v2's own columns of many rows (a parent's count at each insert, a moved
    -- subtree's paths and levels, the network-size fold): copied, each row was an upsert
    -- that changed nothing in legacy but locked the row there until COMMIT. When a key
    -- itself changed, old and new rows cannot be paired: every row is copied, as before.
    -- (Only in an UPDATE's trigger: an INSERT's or a DELETE's has no old_rows to plan with.)
    IF TG_OP = 'UPDATE' THEN
        SELECT coalesce(array_agg(nr.affiliate_id) FILTER (WHERE o.affiliate_id IS NULL
                  OR (nr.parent_affiliate_id, nr.external_id, nr.name, nr.email, nr.status,
                      nr.registration_date, nr.legacy_level_1_referrals, nr.total_deposits,
                      nr.total_bets, nr.total_withdrawals, nr.total_cpa_earned,
                      nr.total_rev_earned, nr.total_commissions_paid, nr.created_at,
                      nr.updated_at)
                     IS DISTINCT FROM
                     (o.parent_affiliate_id, o.external_id, o.name, o.email, o.status,
                      o.registration_date, o.legacy_level_1_referrals, o.total_deposits,
                      o.total_bets, o.total_withdrawals, o.total_cpa_earned,
                      o.total_rev_earned, o.total_commissions_paid, o.created_at,
                      o.updated_at)), '{}'),
               coalesce(bool_or(o.affiliate_id IS NULL), false)
          INTO changed, unpaired
        FROM new_rows nr LEFT JOIN old_rows o USING (affiliate_id);
        IF unpaired THEN
            changed := NULL;
        -- v2's upkeep that changed nothing legacy sees: nothing to copy or report. (The
        -- client's own statement still reports, with its rows, as before.)
        ELSIF cardinality(changed) = 0 AND pg_trigger_depth() > 1 THEN
            RETURN NULL;
        END IF;
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
            WHERE changed IS NULL OR n.affiliate_id = ANY (changed)
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
