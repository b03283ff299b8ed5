-- fature_v2 monitoring (seed plan, day 4 afternoon): performance log, cache, the
-- real_time_metrics view and check_system_health().

CREATE TABLE fature_v2.query_performance_log (
    log_id            BIGSERIAL PRIMARY KEY,
    query_type        VARCHAR(100) NOT NULL,
    query_duration_ms INTEGER NOT NULL,
    affected_rows     INTEGER,
    query_hash        VARCHAR(64),
    parameters        JSONB,
    created_at        TIMESTAMP DEFAULT NOW()
);

CREATE INDEX idx_perf_log_type_time
    ON fature_v2.query_performance_log (query_type, created_at);
CREATE INDEX idx_perf_log_duration
    ON fature_v2.query_performance_log (query_duration_ms, created_at);

CREATE TABLE fature_v2.performance_cache (
    cache_key  VARCHAR(255) PRIMARY KEY,
    cache_data JSONB NOT NULL,
    expires_at TIMESTAMP NOT NULL,
    hit_count  INTEGER DEFAULT 0,
    created_at TIMESTAMP DEFAULT NOW(),
    updated_at TIMESTAMP DEFAULT NOW()
);

CREATE INDEX idx_cache_expiration ON fature_v2.performance_cache (expires_at);
CREATE INDEX idx_cache_hits ON fature_v2.performance_cache (hit_count, updated_at);

CREATE VIEW fature_v2.real_time_metrics AS
WITH affiliate_stats AS (
    SELECT
        COUNT(*) AS total_affiliates,
        COUNT(*) FILTER (WHERE status = 'active') AS active_affiliates,
        MAX(hierarchy_level) AS max_level,
        AVG(hierarchy_level) AS avg_level,
        COUNT(*) FILTER (WHERE direct_referrals_count > 0) AS affiliates_with_referrals
    FROM fature_v2.affiliates_optimized
),
transaction_stats AS (
    SELECT
        COUNT(*) AS transactions_today,
        SUM(amount) AS volume_today,
        AVG(amount) AS avg_transaction_amount,
        COUNT(*) FILTER (WHERE commission_processed = true) AS processed_commissions
    FROM fature_v2.transactions
    WHERE transaction_date >= CURRENT_DATE
),
commission_stats AS (
    SELECT
        COUNT(*) AS total_commissions_today,
        SUM(commission_amount) AS total_commission_amount_today,
        COUNT(*) FILTER (WHERE status = 'paid') AS paid_commissions_today,
        AVG(commission_amount) AS avg_commission_amount
    FROM fature_v2.commissions
    WHERE created_at >= CURRENT_DATE
),
performance_stats AS (
    SELECT
        COUNT(*) AS queries_last_hour,
        AVG(query_duration_ms) AS avg_query_duration,
        MAX(query_duration_ms) AS max_query_duration,
        COUNT(*) FILTER (WHERE query_duration_ms > 100) AS slow_queries
    FROM fature_v2.query_performance_log
    WHERE created_at >= NOW() - INTERVAL '1 hour'
)
SELECT
    as_.*,
    ts.*,
    cs.*,
    ps.*,
    NOW() AS last_updated
FROM affiliate_stats as_
CROSS JOIN transaction_stats ts
CROSS JOIN commission_stats cs
CROSS JOIN performance_stats ps;

CREATE FUNCTION fature_v2.check_system_health()
RETURNS TABLE (
    alert_level     VARCHAR(20),
    alert_type      VARCHAR(50),
    message         TEXT,
    metric_value    NUMERIC,
    threshold_value NUMERIC,
    "timestamp"     TIMESTAMP
)
LANGUAGE plpgsql
SET search_path = fature_v2, public
AS $$
BEGIN
    -- Slow queries in the last hour
    RETURN QUERY
    SELECT
        'WARNING'::VARCHAR(20),
        'slow_queries'::VARCHAR(50),
        format('Detectadas %s consultas lentas (>100ms) na última hora', COUNT(*)),
        COUNT(*)::NUMERIC,
        10::NUMERIC,
        LOCALTIMESTAMP
    FROM query_performance_log q
    WHERE q.created_at >= LOCALTIMESTAMP - INTERVAL '1 hour'
      AND q.query_duration_ms > 100
    HAVING COUNT(*) > 10

    UNION ALL

    -- Commission backlog
    SELECT
        (CASE WHEN COUNT(*) > 10000 THEN 'CRITICAL' ELSE 'WARNING' END)::VARCHAR(20),
        'commission_backlog'::VARCHAR(50),
        format('Fila de comissões pendentes: %s registros', COUNT(*)),
        COUNT(*)::NUMERIC,
        1000::NUMERIC,
        LOCALTIMESTAMP
    FROM commissions c
    WHERE c.status = 'pending'
      AND c.created_at < LOCALTIMESTAMP - INTERVAL '1 hour'
    HAVING COUNT(*) > 1000

    UNION ALL

    -- Error rate (cancelled or disputed commissions) in the last two hours
    SELECT
        'CRITICAL'::VARCHAR(20),
        'high_error_rate'::VARCHAR(50),
        format('Taxa de erro alta: %s%% nas últimas 2 horas',
               to_char(error_stats.error_count * 100.0 / error_stats.total_count, 'FM990.00')),
        round(error_stats.error_count * 100.0 / error_stats.total_count, 2),
        5.0::NUMERIC,
        LOCALTIMESTAMP
    FROM (
        SELECT
            COUNT(*) FILTER (WHERE c.status IN ('cancelled', 'disputed')) AS error_count,
            COUNT(*) AS total_count
        FROM commissions c
        WHERE c.created_at >= LOCALTIMESTAMP - INTERVAL '2 hours'
    ) error_stats
    WHERE error_stats.total_count > 0
      AND (error_stats.error_count * 100.0 / error_stats.total_count) > 5.0;
END;
$$;
