-- The v2 → legacy mirror runs only from stage `target` on (issue 7's reversal), not whenever
-- dual-write is on: before the flip legacy is the truth, and a write made on v2 by anything
-- but cutover (a hand, a bug) must show as drift in `cutover verify`, not overwrite legacy.
-- From `target` on, v2 is the truth: every write on it — the proxy's v2-first statements and
-- anything else — is mirrored into legacy, so stepping back stays possible.
CREATE FUNCTION cutover.reverse_mirror_active()
RETURNS BOOLEAN
LANGUAGE plpgsql STABLE
AS $$
BEGIN
    RETURN coalesce(current_setting('cutover.mirroring', true), '') <> 'on'
       AND coalesce(current_setting('cutover.bulk_load', true), '') <> 'on'
       AND EXISTS (SELECT 1 FROM cutover.query_type_state WHERE stage = 'target');
END;
$$;

CREATE OR REPLACE TRIGGER cutover_mirror_insert
    AFTER INSERT ON fature_v2.affiliates_optimized REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT WHEN (cutover.reverse_mirror_active())
    EXECUTE FUNCTION cutover.mirror_target();
CREATE OR REPLACE TRIGGER cutover_mirror_update
    AFTER UPDATE ON fature_v2.affiliates_optimized
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT WHEN (cutover.reverse_mirror_active())
    EXECUTE FUNCTION cutover.mirror_target();
CREATE OR REPLACE TRIGGER cutover_mirror_delete
    AFTER DELETE ON fature_v2.affiliates_optimized REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT WHEN (cutover.reverse_mirror_active())
    EXECUTE FUNCTION cutover.mirror_target();
