-- What the divergence report needs besides the outcome counts (issue 9).
--
-- Latency distributions of both sides per query type and minute, as counts per bucket
-- (upper bounds in microseconds: 100, 200, 500, 1k, 2k, 5k, 10k, 20k, 50k, 100k, 200k, 500k,
-- 1M, 2M, 5M, and above), so the report can give p50/p95/p99 over any window.
ALTER TABLE cutover.comparison_stats
    ADD COLUMN legacy_us_hist BIGINT[] NOT NULL DEFAULT '{}',
    ADD COLUMN target_us_hist BIGINT[] NOT NULL DEFAULT '{}';

-- Element-wise sum of two histograms (of any lengths).
CREATE FUNCTION cutover.hist_add(a BIGINT[], b BIGINT[])
RETURNS BIGINT[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT coalesce(array_agg(coalesce(x, 0) + coalesce(y, 0) ORDER BY n), '{}')
    FROM unnest(coalesce(a, '{}'), coalesce(b, '{}')) WITH ORDINALITY AS u(x, y, n)
$$;

CREATE AGGREGATE cutover.hist_sum(BIGINT[]) (
    SFUNC = cutover.hist_add,
    STYPE = BIGINT[],
    INITCOND = '{}'
);

-- Every `cutover verify` run against this database: what the report calls the last verify.
CREATE TABLE cutover.verify_runs (
    id          BIGSERIAL PRIMARY KEY,
    ran_at      TIMESTAMPTZ NOT NULL DEFAULT now(),
    ok          BOOLEAN NOT NULL,
    legacy_rows BIGINT NOT NULL,
    target_rows BIGINT NOT NULL,
    missing     BIGINT NOT NULL,
    extra       BIGINT NOT NULL,
    different   BIGINT NOT NULL,
    quarantined BIGINT NOT NULL,
    failed_checks INT NOT NULL
);
