-- Comparison outcomes per query type and minute: what the safety gate and the automatic
-- ramp-down read. The shadow (issue 5) writes it; every replica adds its counts to the same
-- row (upsert), so the gate sees the whole fleet.
--
-- A comparison with a final verdict is `matched` or `confirmed` (a divergence that held in
-- one snapshot: data drift, rewrite bug or error); `transient`, `nondeterministic`,
-- `skipped` and `dropped` are counted apart and are not evidence either way.
CREATE TABLE cutover.comparison_stats (
    query_type       TEXT NOT NULL,
    minute           TIMESTAMPTZ NOT NULL,
    matched          BIGINT NOT NULL DEFAULT 0,
    confirmed        BIGINT NOT NULL DEFAULT 0,
    transient        BIGINT NOT NULL DEFAULT 0,
    nondeterministic BIGINT NOT NULL DEFAULT 0,
    skipped          BIGINT NOT NULL DEFAULT 0,
    dropped          BIGINT NOT NULL DEFAULT 0,
    PRIMARY KEY (query_type, minute)
);
