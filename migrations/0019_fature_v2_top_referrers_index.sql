-- An index for the top-referrers read (issue 16: measured through cutover on 100,000
-- affiliates, `top_referrers` went 86 → 148 ms when v2 served it — a sequential scan of v2's
-- wider rows and a sort). Its target (rules/fature.toml) orders by direct_referrals_count
-- DESC with a LIMIT over the affiliates that have referrals: this index returns them in that
-- order, and leaves out every affiliate without referrals (most of the tree), so a new
-- affiliate (count 0) adds no entry to it. A parent's count update already changes an
-- indexed column (idx_performance_lookup): it gains one entry more, no HOT update is lost.
CREATE INDEX idx_affiliates_top_referrers
    ON fature_v2.affiliates_optimized (direct_referrals_count DESC, affiliate_id)
    WHERE direct_referrals_count > 0;
