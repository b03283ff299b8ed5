-- Bulk loading for `cutover backfill`, and its bookkeeping.
--
-- The backfill copies millions of rows with their paths, levels, closure rows and counters
-- computed in bulk; the per-row insert triggers would redo that work row by row (and the
-- closure for every ancestor of every row). A session that sets cutover.bulk_load = 'on'
-- (only the backfill does) skips them; every other session — the application's, dual-write's
-- — keeps them.

CREATE OR REPLACE FUNCTION fature_v2.update_hierarchy_on_insert()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    IF current_setting('cutover.bulk_load', true) = 'on' THEN
        RETURN NEW;
    END IF;
    SELECT path, level INTO NEW.hierarchy_path, NEW.hierarchy_level
    FROM child_position(NEW.parent_affiliate_id, NEW.affiliate_id);
    RETURN NEW;
END;
$$;

CREATE OR REPLACE FUNCTION fature_v2.update_referral_counters()
RETURNS TRIGGER
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    IF NEW.parent_affiliate_id IS NULL OR current_setting('cutover.bulk_load', true) = 'on' THEN
        RETURN NULL;
    END IF;

    PERFORM build_hierarchy_index(NEW.affiliate_id);

    UPDATE affiliates_optimized
    SET direct_referrals_count = direct_referrals_count + 1
    WHERE affiliate_id = NEW.parent_affiliate_id;

    UPDATE affiliates_optimized
    SET total_network_size = total_network_size + 1
    WHERE affiliate_id IN (
        SELECT ancestor_id FROM hierarchy_index WHERE descendant_id = NEW.affiliate_id
    );

    RETURN NULL;
END;
$$;

-- Legacy rows that cannot go into the target, and why (orphans, cycles, and their subtrees).
CREATE TABLE cutover.backfill_quarantine (
    affiliate_id        BIGINT PRIMARY KEY,
    parent_affiliate_id BIGINT,
    reason              TEXT NOT NULL,
    detected_at         TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- Where a backfill stands, so that one killed half-way resumes where it stopped.
CREATE TABLE cutover.backfill_progress (
    id          TEXT PRIMARY KEY DEFAULT 'backfill' CHECK (id = 'backfill'),
    phase       TEXT NOT NULL,
    last_level  INTEGER NOT NULL DEFAULT 0,
    last_id     BIGINT NOT NULL DEFAULT 0,
    rows_copied BIGINT NOT NULL DEFAULT 0,
    started_at  TIMESTAMPTZ NOT NULL DEFAULT now(),
    updated_at  TIMESTAMPTZ NOT NULL DEFAULT now()
);
