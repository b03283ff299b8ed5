-- The backfill's rows and closure loaded at the same time, on two connections (issue 19):
-- each keeps its own checkpoint, so a backfill killed half-way resumes both where they were.
-- The rows keep theirs in last_id; the closure's is its last (level, id).
ALTER TABLE cutover.backfill_progress
    ADD COLUMN IF NOT EXISTS closure_level INTEGER NOT NULL DEFAULT 0,
    ADD COLUMN IF NOT EXISTS closure_id    BIGINT  NOT NULL DEFAULT 0,
    -- v2 held nothing when the plan was made (no row, no pair, no pending delta) and the
    -- copy found no row already there: the counters the rows went in with are v2's truth,
    -- and the counters phase has nothing to correct.
    ADD COLUMN IF NOT EXISTS counters_exact BOOLEAN NOT NULL DEFAULT false;

-- A backfill of an earlier version stopped in its closure phase resumes from its checkpoint.
UPDATE cutover.backfill_progress
SET closure_level = last_level, closure_id = last_id
WHERE phase = 'closure';

-- What each item set aside belongs to, so that a table's indexes are built again as soon as
-- its own load is done, while the other table still loads (NULL: recorded by an earlier
-- version, put back with everything else).
ALTER TABLE cutover.backfill_set_aside ADD COLUMN IF NOT EXISTS relation TEXT;
