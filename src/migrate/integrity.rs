//! The seed's integrity checks of `fature_v2` (its `IntegrityValidator`), plus the checks
//! that compare the derived hierarchy with the truth recomputed from parent links.
//!
//! Each check is one SQL statement counting offending rows: zero passes. They run together
//! in one `REPEATABLE READ READ ONLY` snapshot, so a concurrent write cannot make two checks
//! disagree. Used by the tests of the triggers today and by `cutover verify` later.

use tokio_postgres::Client;

/// One check: a count of offending rows.
#[derive(Debug, Clone, Copy)]
pub struct Check {
    /// The seed's group name (`hierarchy_integrity`, `hierarchy_index`,
    /// `commission_calculations`) or `derived_truth` for the checks the seed lacked.
    pub group: &'static str,
    pub name: &'static str,
    pub sql: &'static str,
}

/// The outcome of one check.
#[derive(Debug, Clone)]
pub struct CheckResult {
    pub group: &'static str,
    pub name: &'static str,
    pub offending: i64,
}

impl CheckResult {
    pub fn passed(&self) -> bool {
        self.offending == 0
    }
}

pub const CHECKS: &[Check] = &[
    // --- seed: validate_hierarchy_integrity ---
    Check {
        group: "hierarchy_integrity",
        name: "orphaned_affiliates",
        sql: "SELECT COUNT(*) FROM fature_v2.affiliates_optimized a
              WHERE a.parent_affiliate_id IS NOT NULL
                AND NOT EXISTS (SELECT 1 FROM fature_v2.affiliates_optimized p
                                WHERE p.affiliate_id = a.parent_affiliate_id)",
    },
    Check {
        group: "hierarchy_integrity",
        name: "level_inconsistencies",
        sql: "SELECT COUNT(*) FROM fature_v2.affiliates_optimized a
              JOIN fature_v2.affiliates_optimized p ON a.parent_affiliate_id = p.affiliate_id
              WHERE a.hierarchy_level != p.hierarchy_level + 1",
    },
    Check {
        group: "hierarchy_integrity",
        name: "invalid_paths",
        sql: "SELECT COUNT(*) FROM fature_v2.affiliates_optimized
              WHERE hierarchy_path IS NULL OR hierarchy_path::text = ''",
    },
    Check {
        group: "hierarchy_integrity",
        name: "counter_mismatches",
        sql: "SELECT COUNT(*) FROM (
                  SELECT a.affiliate_id
                  FROM fature_v2.affiliates_optimized a
                  LEFT JOIN fature_v2.affiliates_optimized c
                         ON a.affiliate_id = c.parent_affiliate_id
                  GROUP BY a.affiliate_id, a.direct_referrals_count
                  HAVING a.direct_referrals_count != COUNT(c.affiliate_id)
              ) mismatches",
    },
    // --- seed: validate_hierarchy_index ---
    Check {
        group: "hierarchy_index",
        name: "duplicate_relationships",
        sql: "SELECT COUNT(*) FROM (
                  SELECT ancestor_id, descendant_id FROM fature_v2.hierarchy_index
                  GROUP BY ancestor_id, descendant_id HAVING COUNT(*) > 1
              ) duplicates",
    },
    Check {
        group: "hierarchy_index",
        name: "invalid_relationships",
        // The seed's two NOT EXISTS joined by OR cannot be planned as anti-joins: they
        // probed the key twice per pair (12 s for 2.3M pairs); the same count by two outer
        // hash joins takes 2 s.
        sql: "SELECT COUNT(*) FROM fature_v2.hierarchy_index hi
              LEFT JOIN fature_v2.affiliates_optimized a ON a.affiliate_id = hi.ancestor_id
              LEFT JOIN fature_v2.affiliates_optimized d ON d.affiliate_id = hi.descendant_id
              WHERE a.affiliate_id IS NULL OR d.affiliate_id IS NULL",
    },
    Check {
        group: "hierarchy_index",
        name: "incorrect_distances",
        sql: "SELECT COUNT(*) FROM fature_v2.hierarchy_index hi
              JOIN fature_v2.affiliates_optimized a ON hi.ancestor_id = a.affiliate_id
              JOIN fature_v2.affiliates_optimized d ON hi.descendant_id = d.affiliate_id
              WHERE hi.level_distance != (d.hierarchy_level - a.hierarchy_level)",
    },
    // --- seed: validate_commission_calculations ---
    Check {
        group: "commission_calculations",
        name: "negative_commissions",
        sql: "SELECT COUNT(*) FROM fature_v2.commissions
              WHERE commission_amount <= 0 OR base_amount <= 0 OR commission_rate <= 0",
    },
    Check {
        group: "commission_calculations",
        name: "calculation_errors",
        sql: "SELECT COUNT(*) FROM fature_v2.commissions
              WHERE ABS(commission_amount - (base_amount * commission_rate)) > 0.01",
    },
    Check {
        group: "commission_calculations",
        name: "missing_transactions",
        sql: "SELECT COUNT(*) FROM fature_v2.commissions c
              WHERE NOT EXISTS (SELECT 1 FROM fature_v2.transactions t
                                WHERE t.transaction_id = c.transaction_id)",
    },
    // --- not in the seed: the derived columns against the parent links ---
    Check {
        group: "derived_truth",
        name: "closure_differs_from_parents",
        // Pairs recomputed from parent links, compared both ways with the closure table.
        // The depth bound keeps a (forbidden) cycle from looping forever.
        sql:
            "WITH RECURSIVE truth(ancestor_id, descendant_id, level_distance) AS (
                  SELECT parent_affiliate_id, affiliate_id, 1
                  FROM fature_v2.affiliates_optimized WHERE parent_affiliate_id IS NOT NULL
                  UNION ALL
                  SELECT p.parent_affiliate_id, t.descendant_id, t.level_distance + 1
                  FROM truth t
                  JOIN fature_v2.affiliates_optimized p ON p.affiliate_id = t.ancestor_id
                  WHERE p.parent_affiliate_id IS NOT NULL AND t.level_distance < 100000
              ),
              stored AS (
                  SELECT ancestor_id, descendant_id, level_distance FROM fature_v2.hierarchy_index
              )
              SELECT (SELECT COUNT(*) FROM (SELECT * FROM truth EXCEPT ALL SELECT * FROM stored) m)
                   + (SELECT COUNT(*) FROM (SELECT * FROM stored EXCEPT ALL SELECT * FROM truth) x)",
    },
    Check {
        group: "derived_truth",
        name: "path_mismatches",
        sql: "SELECT COUNT(*) FROM fature_v2.affiliates_optimized a
              LEFT JOIN fature_v2.affiliates_optimized p ON p.affiliate_id = a.parent_affiliate_id
              WHERE a.hierarchy_path IS DISTINCT FROM
                    CASE WHEN a.parent_affiliate_id IS NULL THEN a.affiliate_id::text::ltree
                         ELSE p.hierarchy_path || a.affiliate_id::text END
                 OR a.hierarchy_level IS DISTINCT FROM nlevel(a.hierarchy_path)",
    },
    Check {
        group: "derived_truth",
        name: "network_size_mismatches",
        // The column plus its pending deltas (migration 0017).
        sql: "SELECT COUNT(*) FROM fature_v2.affiliate_network_sizes a
              WHERE a.total_network_size IS DISTINCT FROM
                    (SELECT COUNT(*) FROM fature_v2.hierarchy_index h
                     WHERE h.ancestor_id = a.affiliate_id)",
    },
];

/// Runs every check in one read-only snapshot.
pub async fn run(client: &Client) -> Result<Vec<CheckResult>, tokio_postgres::Error> {
    client
        .batch_execute("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .await?;
    let mut results = Vec::with_capacity(CHECKS.len());
    for check in CHECKS {
        match client.query_one(check.sql, &[]).await {
            Ok(row) => results.push(CheckResult {
                group: check.group,
                name: check.name,
                offending: row.get(0),
            }),
            Err(error) => {
                let _ = client.batch_execute("ROLLBACK").await;
                return Err(error);
            }
        }
    }
    client.batch_execute("COMMIT").await?;
    Ok(results)
}
