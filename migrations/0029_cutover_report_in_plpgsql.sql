-- The mirror's per-statement report in PL/pgSQL (issue 16; numbers in docs/performance.md,
-- "Dual-write"). Same behaviour.
--
-- cutover.report_statement (0006) was a SQL function that PostgreSQL cannot inline (it
-- returns VOID from a SELECT): called from PL/pgSQL, it was parsed and planned again in
-- every transaction. After the flip the reverse mirror calls it at every write statement of
-- the application's: the four statements of the benchmark's write transaction on v2, with
-- the reverse mirror on, cost 2.20–2.45 ms of machine CPU with it, 1.92–2.10 in PL/pgSQL
-- (8 writers, the same run, alternating). 0020 did the same for the mirror's other helpers.
-- It now also returns at once for a statement the proxy did not tag (nothing is reported
-- for those, as before: report_dual_write returned).
CREATE OR REPLACE FUNCTION cutover.report_statement(
    p_code TEXT, p_direction TEXT, p_query_type TEXT, p_rows BIGINT, p_started TIMESTAMPTZ,
    p_mirrored TIMESTAMPTZ
)
RETURNS VOID
LANGUAGE plpgsql
AS $$
DECLARE
    f BIGINT;
    m BIGINT;
BEGIN
    IF p_query_type IS NULL THEN
        RETURN;
    END IF;
    f := greatest(0, (extract(epoch FROM p_started - statement_timestamp()) * 1e6)::BIGINT);
    m := (extract(epoch FROM p_mirrored - p_started) * 1e6)::BIGINT;
    IF p_direction = 'legacy_to_target' THEN
        PERFORM cutover.report_dual_write(p_code, p_query_type, p_rows, 1, f, m);
    ELSE
        PERFORM cutover.report_dual_write(p_code, p_query_type, p_rows, 1, m, f);
    END IF;
END;
$$;
