-- Indexes that every write to fature_v2 paid for and no read needs (issue 16; the numbers are
-- in docs/performance.md, "Dual-write"; the list in docs/seed-sql-changes.md).
--
-- Each new affiliate writes one closure row per ancestor, and each closure row an entry in
-- every index of hierarchy_index: six of them, three of which serve nothing the other three
-- do not.
--   idx_ancestor_active_level (ancestor_id, is_active, level_distance) WHERE is_active
--       is idx_ancestor_level (ancestor_id, level_distance) WHERE is_active with a column
--       that the predicate already fixes.
--   idx_level_distance (level_distance) WHERE is_active
--       serves "every pair at distance N" over the whole tree, which no query of the plan,
--       the rules or verify asks.
--   idx_descendant_level (descendant_id, level_distance) WHERE is_active
--       idx_hierarchy_descendant (descendant_id) finds the same rows, for every lookup by
--       descendant (the partial index serves only those that also say is_active); the
--       upline's sort by distance is over one path (tens of rows).
-- And affiliates_optimized's idx_affiliates_external (external_id) duplicates the index of
-- its UNIQUE (external_id) constraint.
DROP INDEX fature_v2.idx_ancestor_active_level;
DROP INDEX fature_v2.idx_level_distance;
DROP INDEX fature_v2.idx_descendant_level;
DROP INDEX fature_v2.idx_affiliates_external;
