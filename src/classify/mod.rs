//! Classification: which statements concern the legacy table, and what kind of query each
//! one is.
//!
//! Every Query and Parse goes through the cheap pre-check first: a case-insensitive search
//! for the legacy table's name in the SQL text. Statements that fail it are passthrough and
//! are never parsed — they must cost next to nothing. The others are parsed once per
//! distinct SQL text (a bounded cache keeps the result): a statement that really names the
//! table gets its fingerprint, its query type (the rule that matches it, or an automatic
//! type named after the fingerprint with the default stage) and its route — the target SQL
//! (the rule's own, or the rewritten statement) or the reason it is not routable. SQL the
//! parser cannot read is relayed to legacy untouched and counted, never failed.

pub mod fingerprint;

use std::sync::Arc;

use fingerprint::Fingerprint;
use quick_cache::sync::Cache;

use crate::{
    rewrite::{Rewrite, Rewriter},
    rules::{Bucket, RuleSet, Stage},
};

/// The pre-check for one legacy table name.
#[derive(Debug, Clone)]
pub struct Precheck {
    /// The table's name, lower case (`affiliates`).
    needle: Vec<u8>,
}

impl Precheck {
    pub fn new(table: &str) -> Self {
        Self {
            needle: table.to_ascii_lowercase().into_bytes(),
        }
    }

    /// Whether `sql` may mention the table (any case, quoted or not, qualified or not).
    pub fn mentions_table(&self, sql: &[u8]) -> bool {
        let Some((&first, rest)) = self.needle.split_first() else {
            return false;
        };
        let n = self.needle.len();
        let mut from = 0;
        while let Some(i) = memchr::memchr2(first, first.to_ascii_uppercase(), &sql[from..]) {
            let at = from + i;
            if sql.len() - at < n {
                return false;
            }
            if sql[at + 1..at + n].eq_ignore_ascii_case(rest) {
                return true;
            }
            from = at + 1;
        }
        false
    }
}

/// What a statement is, for the proxy.
#[derive(Debug, Clone, PartialEq)]
pub enum Classification {
    /// Does not concern the legacy table: relayed unchanged.
    Passthrough,
    /// Names the legacy table, but the parser cannot read it: relayed to legacy untouched.
    Unparsable { reason: String },
    /// A statement on the legacy table.
    Typed(Typed),
}

/// A statement on the legacy table.
#[derive(Debug, Clone, PartialEq)]
pub struct Typed {
    /// The rule's name, or the automatic `fp_…` name.
    pub query_type: String,
    /// A rule names this query type (otherwise it is automatic).
    pub named: bool,
    pub fingerprint: Fingerprint,
    pub stage: Stage,
    pub bucket: Bucket,
    /// Where it goes on the target, or why it cannot.
    pub route: Rewrite,
    /// The target SQL is the rule's own (not rewritten).
    pub explicit_target: bool,
}

/// Classifies statements against one rule set, with a bounded cache by SQL text.
pub struct Classifier {
    precheck: Precheck,
    rules: Arc<RuleSet>,
    rewriter: Rewriter,
    cache: Cache<String, Arc<Classification>>,
}

/// Distinct SQL texts remembered (statements with inline literals each count).
pub const CACHE_ENTRIES: usize = 10_000;

impl Classifier {
    pub fn new(rules: Arc<RuleSet>) -> Self {
        Self {
            precheck: Precheck::new(&rules.table.legacy.name),
            rewriter: Rewriter::new(&rules.table),
            cache: Cache::new(CACHE_ENTRIES),
            rules,
        }
    }

    pub fn rules(&self) -> &RuleSet {
        &self.rules
    }

    /// Classifies SQL text.
    pub fn classify(&self, sql: &str) -> Arc<Classification> {
        if !self.precheck.mentions_table(sql.as_bytes()) {
            return Arc::new(Classification::Passthrough);
        }
        if let Some(hit) = self.cache.get(sql) {
            return hit;
        }
        let classified = Arc::new(self.classify_uncached(sql));
        self.cache.insert(sql.to_owned(), Arc::clone(&classified));
        classified
    }

    fn classify_uncached(&self, sql: &str) -> Classification {
        let statements = match fingerprint::parse(sql) {
            Ok(s) => s,
            Err(reason) => return Classification::Unparsable { reason },
        };
        if !self.rewriter.concerns(&statements) {
            return Classification::Passthrough;
        }
        let mut normalized = statements.clone();
        let fp = fingerprint::of_statements(&mut normalized);
        let rule = self.rules.query_type_for(&fp);
        let (route, explicit_target) = match rule.and_then(|r| r.target_sql.as_ref()) {
            Some(target) => (Rewrite::Target(target.clone()), true),
            None => (self.rewriter.rewrite_statements(statements), false),
        };
        let defaults = &self.rules.defaults;
        Classification::Typed(Typed {
            query_type: rule.map_or_else(|| fp.id.clone(), |r| r.name.clone()),
            named: rule.is_some(),
            stage: rule.map_or(defaults.stage, |r| r.stage),
            bucket: rule.map_or_else(|| defaults.bucket.clone(), |r| r.bucket.clone()),
            fingerprint: fp,
            route,
            explicit_target,
        })
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;

    #[test]
    fn finds_the_table_in_any_case_or_form() {
        let p = Precheck::new("affiliates");
        for sql in [
            "SELECT * FROM affiliates",
            "select * from PUBLIC.AFFILIATES a",
            "UPDATE \"affiliates\" SET x = 1",
            "SELECT 'public.Affiliates'::regclass",
        ] {
            assert!(p.mentions_table(sql.as_bytes()), "{sql}");
        }
        for sql in [
            "SELECT now()",
            "SELECT * FROM affiliate",
            "",
            "a",
            "affiliate",
        ] {
            assert!(!p.mentions_table(sql.as_bytes()), "{sql}");
        }
    }

    fn classifier() -> Classifier {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules");
        Classifier::new(Arc::new(RuleSet::load_dir(&dir).unwrap()))
    }

    #[test]
    fn named_automatic_passthrough_and_unparsable() {
        let c = classifier();
        let Classification::Typed(t) =
            &*c.classify("select * from affiliates where affiliate_id = 7")
        else {
            panic!()
        };
        assert_eq!((t.query_type.as_str(), t.named), ("affiliate_by_id", true));
        assert!(matches!(&t.route, Rewrite::Target(sql) if sql.contains("affiliates_optimized")));

        let Classification::Typed(t) =
            &*c.classify("SELECT name FROM affiliates WHERE email LIKE $1")
        else {
            panic!()
        };
        assert!(!t.named && t.query_type.starts_with("fp_"));
        assert_eq!(t.stage, Stage::Legacy);

        assert_eq!(*c.classify("SELECT now()"), Classification::Passthrough);
        assert_eq!(
            *c.classify("SELECT * FROM affiliates_archive"),
            Classification::Passthrough
        );
        assert!(matches!(
            *c.classify("SELECT * FROM affiliates FOR NO KEY UPDATE"),
            Classification::Unparsable { .. } | Classification::Typed(_)
        ));
        assert!(matches!(
            *c.classify("SELEC * FROM affiliates"),
            Classification::Unparsable { .. }
        ));
    }

    #[test]
    fn explicit_targets_win() {
        let c = classifier();
        let Classification::Typed(t) = &*c.classify("SELECT affiliate_id, level_1_referrals FROM affiliates WHERE level_1_referrals > 0 ORDER BY level_1_referrals DESC LIMIT 10") else {
            panic!()
        };
        assert_eq!(t.query_type, "top_referrers");
        assert!(t.explicit_target);
    }
}
