-- Behaviour changes (rules' [[behaviour_change]]): where v2 answers differently on purpose.
-- Reviewers accept each one here before the gate lets its query types serve from v2; how often
-- each kind happened is read by the gate and the report.

-- One row per accepted change (by its name in the rules, with the kind it was accepted as).
CREATE TABLE cutover.behaviour_acceptances (
    change       TEXT PRIMARY KEY,
    kind         TEXT NOT NULL,
    reason       TEXT NOT NULL,
    accepted_by  TEXT NOT NULL,
    via          TEXT NOT NULL CHECK (via IN ('api', 'sql')),
    accepted_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- What the proxies saw of a kind that shows as an error on statements v2 served (a refused
-- cycle after the flip), per minute, added up by every replica.
CREATE TABLE cutover.behaviour_change_stats (
    kind     TEXT NOT NULL,
    minute   TIMESTAMPTZ NOT NULL,
    occurred BIGINT NOT NULL,
    PRIMARY KEY (kind, minute)
);

-- How often a kind happened, from what the database keeps of it:
--   refused_cycle      moves legacy accepted and the mirror could not bring into v2 (recorded
--                      in write_divergences with chk_no_cycle), plus those v2 refused when it
--                      served them (behaviour_change_stats);
--   detached_children  v2's rows detached from a deleted parent (fature_v2.detached_affiliates);
--   quarantined_rows   the rows the backfill could not place (cutover.backfill_quarantine).
CREATE FUNCTION cutover.behaviour_observed(p_kind TEXT)
RETURNS BIGINT
LANGUAGE sql STABLE
AS $$
    SELECT CASE p_kind
        WHEN 'refused_cycle' THEN
            (SELECT count(*) FROM cutover.write_divergences
             WHERE sqlstate = '23514' AND constraint_name = 'chk_no_cycle')
            + (SELECT coalesce(sum(occurred), 0) FROM cutover.behaviour_change_stats
               WHERE kind = 'refused_cycle')::int8
        WHEN 'detached_children' THEN (SELECT count(*) FROM fature_v2.detached_affiliates)
        WHEN 'quarantined_rows' THEN (SELECT count(*) FROM cutover.backfill_quarantine)
    END
$$;
