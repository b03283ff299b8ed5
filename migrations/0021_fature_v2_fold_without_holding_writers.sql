-- The network-size fold (0017), made not to hold the application's writers up (issue 16).
--
-- Measured after the flip with 8 writers under one root: with 0017's fold the CPUs were 57%
-- busy (writers waiting), without any fold 98%. Two causes:
--   1. 0017's fold found the deltas of rows that are gone with a NOT EXISTS that PostgreSQL
--      ran as a scan of every affiliate, and deleted deltas by scanning all of them: a fold
--      cost what was pending, not what it folded, and held its rows that long.
--   2. A writer's foreign-key checks (each new closure row checks its ancestor, the root
--      among them; its deferred parent key at COMMIT) wait for a transaction that updated
--      the row they check until it commits, even though the update changes no key. So every
--      row the fold updates holds up every writer that checks it, for as long as the fold
--      runs.
-- Now every step goes by index (a fold costs what it folds), the fold gives up any wait
-- after 20 ms (lock_timeout; nothing folded, it returns 0), and cutover serve folds 200 rows
-- at a time every 250 ms (src/migrate/fold.rs): the CPUs 98% busy again, nothing pending.

-- Folds the pending deltas of up to p_rows affiliates into their rows; returns how many it
-- folded (0017's contract; see above for what changed).
CREATE OR REPLACE FUNCTION fature_v2.fold_network_sizes(p_rows INTEGER DEFAULT 10000)
RETURNS INTEGER
LANGUAGE plpgsql
SECURITY DEFINER
SET search_path = fature_v2, public
SET lock_timeout = '20ms'
AS $$
DECLARE
    folded INTEGER;
BEGIN
    IF NOT pg_try_advisory_xact_lock(hashtext('fature_v2.fold_network_sizes')) THEN
        RETURN 0;
    END IF;
    -- Every step by index (the deltas' and the primary key): a fold costs what it folds,
    -- not what is pending, and holds its rows for as short a time as that takes.
    WITH candidates AS (
        SELECT DISTINCT affiliate_id FROM network_size_deltas ORDER BY affiliate_id LIMIT p_rows
    ), mine AS (
        SELECT a.affiliate_id FROM affiliates_optimized a
        WHERE a.affiliate_id IN (SELECT affiliate_id FROM candidates)
        FOR NO KEY UPDATE SKIP LOCKED
    ), taken AS (
        -- The deltas of a row that is gone (its delete committed) go too.
        DELETE FROM network_size_deltas d
        USING (SELECT affiliate_id FROM mine
               UNION
               SELECT c.affiliate_id FROM candidates c
               WHERE NOT EXISTS (SELECT 1 FROM affiliates_optimized a
                                 WHERE a.affiliate_id = c.affiliate_id)) k
        WHERE d.affiliate_id = k.affiliate_id
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
EXCEPTION WHEN lock_not_available THEN
    -- A row the fold needed was held after all (SKIP LOCKED skips row locks, not every
    -- wait): nothing folded this time; the next fold tries again.
    RETURN 0;
END;
$$;

-- Everything pending that can be folded now, 500 rows a transaction-step (0017's, smaller batches).
CREATE OR REPLACE FUNCTION fature_v2.fold_all_network_sizes()
RETURNS BIGINT
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
DECLARE
    total BIGINT := 0;
    n     INTEGER;
BEGIN
    LOOP
        n := fold_network_sizes(500);
        total := total + n;
        EXIT WHEN n = 0;
    END LOOP;
    RETURN total;
END;
$$;
