//! Rule files: the customer's set is valid (offline and against a migrated database), and
//! every kind of broken file is reported at its file:line:column.

mod support;

use std::path::PathBuf;

use cutover::routing::rules::{Diagnostic, RuleSet, Stage};

const TABLE: &str = r#"[table]
legacy = "public.affiliates"
target = "fature_v2.affiliates_optimized"
key = "affiliate_id"
columns = ["affiliate_id", "parent_affiliate_id", "external_id", "name", "email", "status",
    "registration_date", "level_1_referrals", "total_deposits", "total_bets",
    "total_withdrawals", "total_cpa_earned", "total_rev_earned", "total_commissions_paid",
    "created_at", "updated_at"]
[columns.level_1_referrals]
target = "direct_referrals_count"
derived = true
"#;

/// Lines of TABLE, so that the snippets' line numbers below are easy to read.
const TABLE_LINES: usize = 11;

fn check(snippet: &str) -> Vec<Diagnostic> {
    let text = format!("{TABLE}{snippet}");
    match RuleSet::from_sources(&[(PathBuf::from("rules/test.toml"), text)]) {
        Ok(_) => Vec::new(),
        Err(e) => e.0,
    }
}

/// Asserts exactly one diagnostic, at `line` (counted within the snippet) and `column`.
fn assert_one(snippet: &str, line: usize, column: usize, needle: &str) {
    let diagnostics = check(snippet);
    assert_eq!(diagnostics.len(), 1, "{diagnostics:#?}");
    let d = &diagnostics[0];
    let shown = d.to_string();
    assert_eq!(
        (d.line, d.column),
        (TABLE_LINES + line, column),
        "position of {shown}"
    );
    assert!(shown.starts_with("rules/test.toml:"), "{shown}");
    assert!(shown.contains(needle), "{needle:?} not in {shown}");
}

const ONE_QUERY_TYPE: &str =
    "[[query_type]]\nname = \"ok\"\nmatch = \"SELECT * FROM affiliates\"\n";

#[test]
fn behaviour_changes_are_checked() {
    let change = |body: &str| format!("{ONE_QUERY_TYPE}[[behaviour_change]]\n{body}");
    let valid = "name = \"c\"\nkind = \"refused_cycle\"\nquery_types = [\"ok\"]\ndescription = \"v2 refuses\"\n";
    assert!(check(&change(valid)).is_empty());
    assert_one(
        &change(&valid.replace("refused_cycle", "refuses_cycles")),
        6,
        8,
        "unknown behaviour change kind \"refuses_cycles\": one of refused_cycle, detached_children, quarantined_rows",
    );
    assert_one(
        &change(&valid.replace("[\"ok\"]", "[\"ok\", \"nope\"]")),
        7,
        22,
        "no query type \"nope\" in the rules",
    );
    assert_one(
        &change(&valid.replace("name = \"c\"", "name = \"Cycle-Refused\"")),
        5,
        8,
        "lower case letters, digits and _",
    );
    assert_one(
        &change(&valid.replace("v2 refuses", " ")),
        8,
        15,
        "say what the application sees",
    );
    let twice = format!(
        "{}[[behaviour_change]]\n{}",
        change(valid),
        valid.replace("\"c\"", "\"d\"")
    );
    assert_one(
        &twice,
        11,
        8,
        "kind refused_cycle is already declared as \"c\"",
    );
    assert_one(
        &format!(
            "{ONE_QUERY_TYPE}[[behaviour_change]]\nname = \"c\"\nkind = \"refused_cycle\"\nquery_types = [\"ok\"]\n"
        ),
        4,
        1,
        "missing field `description`",
    );
}

#[test]
fn a_valid_snippet_passes() {
    assert!(
        check("[[query_type]]\nname = \"ok\"\nmatch = \"SELECT * FROM affiliates\"\n").is_empty()
    );
}

#[test]
fn unknown_columns_are_pointed_at() {
    assert_one(
        "[columns.email_addr]\ntarget = \"email\"\n",
        1,
        10,
        "column \"email_addr\" is not in public.affiliates",
    );
    assert_one(
        "[[query_type]]\nname = \"q\"\nmatch = \"SELECT 1 FROM affiliates\"\n[query_type.compare]\nignore_columns = [\"updated_at\", \"nope\"]\n",
        5,
        33,
        "column \"nope\" is not in public.affiliates",
    );
}

/// An expected class names its kind: drift by default; errors are never expected by column.
#[test]
fn expected_classes_name_a_kind() {
    assert!(check("[[query_type]]\nname = \"q\"\nmatch = \"SELECT 1 FROM affiliates\"\n[[query_type.compare.expected]]\nclass = \"c\"\nkind = \"rewrite_bug\"\ncolumns = [\"name\"]\nnote = \"n\"\n").is_empty());
    assert_one(
        "[[query_type]]\nname = \"q\"\nmatch = \"SELECT 1 FROM affiliates\"\n[[query_type.compare.expected]]\nclass = \"c\"\nkind = \"error\"\ncolumns = [\"name\"]\nnote = \"n\"\n",
        6,
        8,
        "expected kind \"error\"",
    );
}

/// `[redaction]`: more sensitive name parts, and columns shown; a shown column must exist.
#[test]
fn the_redaction_policy_is_read_and_checked() {
    let text = format!("{TABLE}[redaction]\nsensitive = [\"status\"]\nshown = [\"name\"]\n");
    let rules = RuleSet::from_sources(&[(PathBuf::from("rules/test.toml"), text)]).unwrap();
    assert!(rules.redaction.sensitive("status") && rules.redaction.sensitive("email"));
    assert!(!rules.redaction.sensitive("name"));
    assert_one(
        "[redaction]\nshown = [\"name\", \"nickname\"]\n",
        2,
        18,
        "column \"nickname\" is not in the table's columns",
    );
    assert_one(
        "[redaction]\nsensitive = [\"\"]\n",
        2,
        14,
        "empty name part",
    );
}

#[test]
fn bad_toml_is_pointed_at() {
    assert_one("[[query_type]]\nname = \"q\nmatch = 1\n", 2, 10, "");
    assert_one(
        "[[query_type]]\nname = \"q\"\nmatch = \"SELECT 1 FROM affiliates\"\nstagee = \"shadow\"\n",
        4,
        1,
        "unknown field `stagee`",
    );
}

#[test]
fn stages_and_percents_are_checked() {
    let qt = "[[query_type]]\nname = \"q\"\nmatch = \"SELECT 1 FROM affiliates\"\n";
    assert_one(
        &format!("{qt}stage = \"shaddow\"\n"),
        4,
        9,
        "unknown stage \"shaddow\"",
    );
    assert_one(
        &format!("{qt}stage = \"cutover\"\npercent = 140\n"),
        5,
        11,
        "percent 140 is not between 0 and 100",
    );
    assert_one(
        &format!("{qt}stage = \"cutover\"\n"),
        4,
        9,
        "needs a percent",
    );
    assert_one(
        &format!("{qt}stage = \"shadow\"\npercent = 10\n"),
        5,
        11,
        "only to stage \"cutover\"",
    );
    assert_one(
        &format!("{qt}bucket = \"nope\"\n"),
        4,
        10,
        "bucket \"nope\"",
    );
    assert_one(
        &format!("{qt}sample_rate = 1.5\n"),
        4,
        15,
        "sample_rate 1.5",
    );
}

#[test]
fn duplicates_and_unparsable_sql_are_refused() {
    let dup = "[[query_type]]\nname = \"q\"\nmatch = \"SELECT 1 FROM affiliates\"\n\
               [[query_type]]\nname = \"q\"\nmatch = \"SELECT 2 FROM affiliates\"\n";
    assert_one(dup, 5, 8, "duplicate query type name \"q\"");
    let same = "[[query_type]]\nname = \"a\"\nmatch = \"SELECT 1 FROM affiliates\"\n\
                [[query_type]]\nname = \"b\"\nmatch = \"select 2 from AFFILIATES\"\n";
    assert_one(
        same,
        6,
        9,
        "matches the same statements as query type \"a\"",
    );
    assert_one(
        "[[query_type]]\nname = \"q\"\nmatch = \"SELECT * FROM affiliates\"\ntarget = \"SELEC broken\"\n",
        4,
        10,
        "target: the SQL does not parse",
    );
    assert_one(
        "[[query_type]]\nname = \"q\"\nmatch = \"SELECT FROM WHERE\"\n",
        3,
        9,
        "match: the SQL does not parse",
    );
}

#[test]
fn all_problems_are_reported_at_once() {
    let text = "[[query_type]]\nname = \"Q-1\"\nmatch = \"SELECT 1 FROM affiliates\"\nstage = \"nope\"\n\
                [query_type.compare]\nignore_columns = [\"x\"]\nnumeric_tolerance = \"-1\"\nfloat_tolerance = -0.5\n";
    let diagnostics = check(text);
    assert_eq!(diagnostics.len(), 5, "{diagnostics:#?}");
    assert!(
        diagnostics
            .iter()
            .any(|d| d.message.contains("float_tolerance")),
        "{diagnostics:#?}"
    );
}

#[test]
fn the_customer_rules_are_valid_offline() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("rules");
    let set = RuleSet::load_dir(&dir).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(set.table.legacy.to_string(), "public.affiliates");
    assert_eq!(set.query_types.len(), 17);
    assert!(set.query_types.iter().all(|q| q.stage == Stage::Legacy));
    // Every statement of the workload file has its query type, by fingerprint.
    let workload = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/workloads/fature_app.sql"),
    );
    if let Ok(workload) = workload {
        for (ty, sql) in workload_statements(&workload) {
            let fp = cutover::routing::fingerprint::fingerprint(&sql).unwrap();
            let found = set.query_type_for(&fp).map(|q| q.name.as_str());
            if ty.starts_with('(') {
                assert_eq!(found, None, "{sql}");
            } else {
                assert_eq!(found, Some(ty.as_str()), "{sql}");
            }
        }
    }
}

/// (type, statement) pairs of the workload file's "-- type:" blocks.
pub fn workload_statements(text: &str) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("-- type:") {
            let ty = rest.split_whitespace().next().unwrap_or_default();
            let ty = if ty.starts_with('(') {
                "(passthrough)"
            } else {
                ty
            };
            out.push((ty.to_owned(), String::new()));
        } else if let Some((_, sql)) = out.last_mut()
            && !line.trim_start().starts_with("--")
        {
            sql.push_str(line);
            sql.push('\n');
        }
    }
    for (_, sql) in &mut out {
        *sql = sql.trim().trim_end_matches(';').to_owned();
    }
    out
}

#[tokio::test]
async fn the_customer_rules_hold_against_a_migrated_database() {
    let db = support::migrated_db().await;
    let (code, out, err) = support::cutover(
        &["rules", "check", "rules", "--database-url", &db.url()],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("ok: public.affiliates → fature_v2.affiliates_optimized, 17 query types"));
}

#[tokio::test]
async fn target_sql_that_does_not_prepare_or_match_is_refused_against_the_database() {
    let db = support::migrated_db().await;
    let dir = tempfile::tempdir().unwrap();
    let snippet = "[[query_type]]\nname = \"wrong_table\"\nmatch = \"SELECT name FROM affiliates WHERE affiliate_id = $1\"\n\
                   target = \"SELECT name FROM fature_v2.nope WHERE affiliate_id = $1\"\n\
                   [[query_type]]\nname = \"wrong_type\"\nmatch = \"SELECT affiliate_id FROM affiliates WHERE status = $1\"\n\
                   target = \"SELECT affiliate_id::int4 FROM fature_v2.affiliates_optimized WHERE status = $1\"\n\
                   [[query_type]]\nname = \"wrong_count\"\nmatch = \"SELECT name FROM affiliates\"\n\
                   target = \"SELECT name, email FROM fature_v2.affiliates_optimized\"\n";
    std::fs::write(dir.path().join("t.toml"), format!("{TABLE}{snippet}")).unwrap();
    let (code, out, _) = support::cutover(
        &[
            "rules",
            "check",
            dir.path().to_str().unwrap(),
            "--database-url",
            &db.url(),
        ],
        &[],
    );
    assert_eq!(code, 1, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 3, "{out}");
    assert!(lines[0].ends_with(&format!("t.toml:{}:10: wrong_table: the target SQL does not prepare: relation \"fature_v2.nope\" does not exist", TABLE_LINES + 4)), "{out}");
    assert!(lines[1].contains("wrong_type: column affiliate_id int4 of the target SQL does not match legacy's affiliate_id int8"), "{out}");
    assert!(
        lines[2].contains("wrong_count: the target SQL returns 2 columns, the legacy statement 1"),
        "{out}"
    );
}

#[test]
fn the_check_command_prints_every_diagnostic_and_exits_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("a.toml"),
        format!("{TABLE}[[query_type]]\nname = \"q\"\nmatch = \"SELECT 1 FROM affiliates\"\nstage = \"cutover\"\npercent = 140\n"),
    )
    .unwrap();
    std::fs::write(dir.path().join("b.toml"), "[[query_type]]\nname = \"q\"\n").unwrap();
    let (code, out, _) = support::cutover(&["rules", "check", dir.path().to_str().unwrap()], &[]);
    assert_eq!(code, 1);
    assert!(
        out.contains(&format!("a.toml:{}:11: percent 140", TABLE_LINES + 5)),
        "{out}"
    );
    assert!(
        out.contains("b.toml:1:1: query type \"q\": give match"),
        "{out}"
    );
}

#[test]
fn a_query_type_past_legacy_needs_a_route() {
    let snippet = "[[query_type]]\nname = \"q\"\nmatch = \"SELECT ctid FROM affiliates\"\nstage = \"shadow\"\n";
    assert_one(snippet, 3, 9, "not routable (system column ctid");
    // The same at stage legacy is fine, and so is a write in shadow (mirrored by dual-write).
    assert!(
        check("[[query_type]]\nname = \"q\"\nmatch = \"SELECT ctid FROM affiliates\"\n").is_empty()
    );
    assert!(check("[[query_type]]\nname = \"w\"\nmatch = \"UPDATE affiliates SET level_1_referrals = 1\"\nstage = \"shadow\"\n").is_empty());
    assert_one(
        "[[query_type]]\nname = \"w\"\nmatch = \"UPDATE affiliates SET level_1_referrals = 1\"\nstage = \"target\"\n",
        3,
        9,
        "derives itself",
    );
}

#[test]
fn explain_says_what_the_proxy_will_do() {
    let (code, out, err) = support::cutover(
        &[
            "rules",
            "explain",
            "select * from AFFILIATES where affiliate_id = 42",
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("affiliate_by_id (named by a rule)"), "{out}");
    assert!(
        out.contains("SELECT * FROM affiliates WHERE affiliate_id = ?"),
        "{out}"
    );
    assert!(out.contains("(rewritten) SELECT * FROM (SELECT"), "{out}");
    // The behaviour changes its query type shows, with what they mean.
    assert!(
        out.contains("v2 differs    children_detached_on_delete (detached_children; to be accepted before v2 serves it): Deleting a parent")
            && out.contains("quarantined_rows_absent (quarantined_rows"),
        "{out}"
    );

    let (_, out, _) = support::cutover(
        &[
            "rules",
            "explain",
            "--json",
            "WITH RECURSIVE up AS (SELECT affiliate_id, parent_affiliate_id, 0 AS distance FROM affiliates WHERE affiliate_id = 77 UNION ALL SELECT a.affiliate_id, a.parent_affiliate_id, up.distance + 1 FROM affiliates a JOIN up ON a.affiliate_id = up.parent_affiliate_id) SELECT affiliate_id, distance FROM up WHERE distance > 0 ORDER BY distance",
        ],
        &[],
    );
    let json: serde_json::Value = serde_json::from_str(&out).expect("JSON");
    assert_eq!(json["query_type"], "upline");
    assert_eq!(json["target_from"], "rule");
    assert!(
        json["target_sql"]
            .as_str()
            .unwrap()
            .contains("descendant_id = 77"),
        "{json}"
    );

    let (_, out, _) = support::cutover(&["rules", "explain", "SELECT ctid FROM affiliates"], &[]);
    assert!(out.contains("not routable  system column ctid"), "{out}");
    let (_, out, _) = support::cutover(&["rules", "explain", "SELECT now()"], &[]);
    assert!(out.contains("passthrough"), "{out}");
}

/// Against a database not migrated yet: one cause, with what to do, not a "does not prepare"
/// for every query type (issue 20, item 6).
#[tokio::test]
async fn an_unmigrated_database_is_one_problem_with_the_way_out() {
    let db = support::legacy_db().await;
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/rules");
    let (code, out, _) =
        support::cutover(&["rules", "check", rules, "--database-url", &db.url()], &[]);
    assert_eq!(code, 1, "{out}");
    let problems: Vec<&str> = out.lines().filter(|l| l.contains(".toml:")).collect();
    assert_eq!(problems.len(), 1, "{out}");
    assert!(problems[0].contains("run `cutover migrate`"), "{out}");
}

#[test]
fn a_query_type_name_fits_a_postgresql_identifier() {
    // The name travels in the proxy's tag on every write, and the mirror's queue keeps it
    // in a bounded column: no longer than PostgreSQL's own identifiers (63 bytes).
    let named = |name: &str| {
        format!("[[query_type]]\nname = \"{name}\"\nmatch = \"SELECT * FROM affiliates\"\n")
    };
    assert!(check(&named(&"q".repeat(63))).is_empty());
    assert_one(&named(&"q".repeat(64)), 2, 8, "longer than 63");
}
