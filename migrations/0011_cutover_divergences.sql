-- The divergence store (issue 5): what the shadow found, shared by every replica.
--
-- comparison_stats gains the split of confirmed divergences by class, the ones reviewers
-- expect (counted apart, not in `confirmed`), and both sides' latency as the shadow measured
-- it (sums and maxima in microseconds over `timed` comparisons).
ALTER TABLE cutover.comparison_stats
    ADD COLUMN drift          BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN rewrite_bug    BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN errors         BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN undetermined   BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN expected       BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN timed          BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN legacy_us_sum  BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN target_us_sum  BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN legacy_us_max  BIGINT NOT NULL DEFAULT 0,
    ADD COLUMN target_us_max  BIGINT NOT NULL DEFAULT 0;
CREATE INDEX comparison_stats_recent ON cutover.comparison_stats (minute);

-- Sampled divergences: a bounded number per query type and hour, each with the SQL pair
-- (literals of inline statements normalized away), the parameters (values bound to
-- sensitive or unknown columns redacted), the differing rows (bounded), its class and the
-- rules it was found under. Kept for `retention` (the shadow deletes older ones).
CREATE TABLE cutover.divergences (
    id             BIGSERIAL PRIMARY KEY,
    found_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    query_type     TEXT NOT NULL,
    fingerprint    TEXT NOT NULL,
    kind           TEXT NOT NULL
                   CHECK (kind IN ('drift', 'rewrite_bug', 'error', 'undetermined')),
    -- The reviewers' class when it was expected (rules file or mark), else NULL.
    expected_class TEXT,
    columns        TEXT[] NOT NULL DEFAULT '{}',   -- the output columns that differ
    legacy_sql     TEXT NOT NULL,
    target_sql     TEXT NOT NULL,
    params         JSONB NOT NULL DEFAULT '[]',
    diff           JSONB NOT NULL,
    legacy_error   TEXT,
    target_error   TEXT,
    legacy_us      BIGINT,
    target_us      BIGINT,
    rules_version  TEXT NOT NULL,
    replica        TEXT NOT NULL
);
CREATE INDEX divergences_by_type ON cutover.divergences (query_type, found_at DESC);
CREATE INDEX divergences_recent ON cutover.divergences (found_at);

-- Reviewers' marks: a class of divergence (query type, kind, columns) that is expected, with
-- why. A confirmed divergence of that query type and kind whose differing columns are all
-- among `columns` is counted `expected`, apart from the confirmed ones.
CREATE TABLE cutover.divergence_marks (
    id         BIGSERIAL PRIMARY KEY,
    query_type TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('drift', 'rewrite_bug', 'error', 'undetermined')),
    columns    TEXT[] NOT NULL CHECK (cardinality(columns) > 0),
    class      TEXT NOT NULL,
    note       TEXT NOT NULL CHECK (note <> ''),
    marked_by  TEXT NOT NULL,
    marked_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    UNIQUE (query_type, kind, class)
);
