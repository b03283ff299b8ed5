-- What `cutover backfill` sets aside while it bulk-loads (secondary indexes, v2's parent
-- key and per-row triggers), with the statement that puts each back. A backfill killed while
-- they are aside puts them back when it is run again; `verify` fails its `backfill_set_aside`
-- check meanwhile. (Dual-write hands every write to the backfill until it completes, so
-- nothing else writes v2 while they are aside.)
CREATE TABLE cutover.backfill_set_aside (
    name         TEXT PRIMARY KEY,
    restore      TEXT NOT NULL,
    set_aside_at TIMESTAMPTZ NOT NULL DEFAULT now()
);
