-- The closure table's rows are identified by (ancestor_id, descendant_id), already UNIQUE and
-- NOT NULL; the seed's surrogate `id BIGSERIAL` is read by nothing. It cost every closure row
-- an index entry and a sequence step, and the sequence step is the one change a rolled-back
-- transaction leaves behind: `cutover repair --dry-run` (which tries its repair, then rolls
-- it back) moved `hierarchy_index_id_seq`. Dropping the column drops its index and sequence;
-- no row is rewritten.
ALTER TABLE fature_v2.hierarchy_index DROP COLUMN id;
