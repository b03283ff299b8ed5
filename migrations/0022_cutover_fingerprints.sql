-- Automatic query types as first-class as named ones (issue 18, item 5): the normalized text
-- of every automatic type the shadow has seen, so that an operator can read what `fp_…`
-- stands for and `cutover rules promote fp_… --name …` can write it into the rules.

CREATE TABLE IF NOT EXISTS cutover.fingerprints (
    fingerprint TEXT PRIMARY KEY,
    -- The statement with its literals and parameters normalized to `?` (never a value).
    normalized  TEXT NOT NULL,
    first_seen  TIMESTAMPTZ NOT NULL DEFAULT now()
);

-- A promoted type's live stage carries over under its new name, audited as such.
ALTER TABLE cutover.stage_audit DROP CONSTRAINT IF EXISTS stage_audit_via_check;
ALTER TABLE cutover.stage_audit
    ADD CONSTRAINT stage_audit_via_check CHECK (via IN ('api', 'sql', 'auto', 'promote'));

-- A verify's performance criteria recorded apart from its data verdict (issue 20): timing is
-- not drift, and a loaded server must not block a write type's cutover as if it were.
ALTER TABLE cutover.verify_runs ADD COLUMN IF NOT EXISTS slow_timings INT NOT NULL DEFAULT 0;
