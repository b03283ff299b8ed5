//! `cutover report` and `/status`: traffic with known outcomes through the proxy — matches, a
//! confirmed drift, a rewrite bug, transients — and the report's numbers checked in JSON,
//! Markdown and HTML (rendered by headless Chromium, with a screenshot); an empty window, a
//! query type without samples and an unreachable database each give a sensible answer.

mod support;

use std::{path::Path, process::Command, time::Duration};

use support::{Proxy, TestDb, cutover, http_get};
use tokio_postgres::Client;

const EXTRA: &str = r#"
[[query_type]]
name = "wrong_column"
match = "SELECT affiliate_id, name FROM affiliates WHERE affiliate_id = $1"
target = "SELECT affiliate_id, external_id AS name FROM fature_v2.affiliates_optimized WHERE affiliate_id = $1"
stage = "shadow"

# Differs outside a transaction, agrees inside the confirmation's snapshot: a deterministic
# stand-in for a read that raced a write.
[[query_type]]
name = "racy"
match = "SELECT affiliate_id, status FROM affiliates WHERE affiliate_id = $1"
target = "SELECT affiliate_id, status FROM fature_v2.affiliates_optimized WHERE affiliate_id = $1 AND current_setting('transaction_isolation') = 'repeatable read'"
stage = "shadow"
"#;

/// The reviewers' read-only token for `/status`.
const READ_TOKEN: &str = "read-token-0123456789";

async fn setup() -> (TestDb, Proxy, tempfile::TempDir) {
    let db = support::tree_db(200).await;
    let rules = support::rules_with(&[("affiliate_by_id", "stage = \"shadow\"")], EXTRA);
    let proxy = support::proxy_on(&db, &rules, |c| {
        c.read_tokens = Some(
            [("viewer".to_owned(), READ_TOKEN.to_owned())]
                .into_iter()
                .collect(),
        );
    })
    .await;
    (db, proxy, rules)
}

/// 20 reads by id (one of them drifted), 5 through a wrong rule, 5 racy ones; waits until
/// all 30 are counted.
async fn known_traffic(db: &TestDb, proxy: &Proxy) {
    let direct = db.client().await;
    direct
        .batch_execute(
            "BEGIN; SET LOCAL cutover.mirroring = 'on';
             UPDATE fature_v2.affiliates_optimized SET name = 'drifted' WHERE affiliate_id = 7;
             COMMIT",
        )
        .await
        .unwrap();
    let app = proxy.client(&db.name).await;
    for id in 1..=20i64 {
        app.query("SELECT * FROM affiliates WHERE affiliate_id = $1", &[&id])
            .await
            .unwrap();
    }
    for id in 1..=5i64 {
        app.query(
            "SELECT affiliate_id, name FROM affiliates WHERE affiliate_id = $1",
            &[&id],
        )
        .await
        .unwrap();
        app.query(
            "SELECT affiliate_id, status FROM affiliates WHERE affiliate_id = $1",
            &[&id],
        )
        .await
        .unwrap();
    }
    counted(&direct, 30).await;
}

async fn counted(client: &Client, total: i64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let n: i64 = client
            .query_one(
                "SELECT coalesce(sum(matched + confirmed + expected + transient), 0)::int8
                 FROM cutover.comparison_stats",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        if n >= total {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{n} of {total} counted"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn report(db: &TestDb, format: &str, extra: &[&str]) -> String {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/rules");
    let url = db.url();
    let mut args = vec![
        "report",
        "--database-url",
        url.as_str(),
        "--format",
        format,
        "--rules",
        rules,
        "--since",
        "1h",
    ];
    args.extend(extra);
    let (code, out, err) = cutover(&args, &[]);
    assert_eq!(code, 0, "{err}");
    out
}

fn query_type<'a>(json: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    json["query_types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["query_type"] == name)
        .unwrap_or_else(|| panic!("{name} not in the report"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn known_outcomes_in_every_format_and_language() {
    let (db, proxy, _rules) = setup().await;
    known_traffic(&db, &proxy).await;
    // The samples reach the store with the counts' next flush.
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let json: serde_json::Value = serde_json::from_str(
        &tokio::task::spawn_blocking({
            let name = db.name.clone();
            move || report(&TestDb { name }, "json", &[])
        })
        .await
        .unwrap(),
    )
    .unwrap();
    let by_id = query_type(&json, "affiliate_by_id");
    assert_eq!(by_id["stage"], "shadow");
    assert_eq!(by_id["samples"], 20);
    assert_eq!(by_id["outcomes"]["matched"], 19);
    assert_eq!(by_id["outcomes"]["drift"], 1);
    assert_eq!(by_id["match_rate"], 0.95);
    assert_eq!(by_id["verdict"]["ready"], false);
    assert!(
        by_id["verdict"]["missing"][0]
            .as_str()
            .unwrap()
            .contains("980 more")
    );
    assert_eq!(by_id["examples"][0]["kind"], "drift");
    assert_eq!(by_id["examples"][0]["columns"][0], "name");
    assert!(by_id["legacy"]["p99_ms"].as_f64().is_some(), "{by_id}");
    let wrong = query_type(&json, "wrong_column");
    assert_eq!(wrong["outcomes"]["rewrite_bug"], 5);
    assert_eq!(wrong["match_rate"], 0.0);
    let racy = query_type(&json, "racy");
    assert_eq!(
        (
            racy["outcomes"]["transient"].as_i64(),
            racy["outcomes"]["confirmed"].as_i64()
        ),
        (Some(5), Some(0))
    );
    // A type nothing compared yet.
    let quiet = query_type(&json, "top_referrers");
    assert_eq!(quiet["samples"], 0);
    assert_eq!(quiet["verdict"]["next"], "shadow");
    assert_eq!(json["overall"]["samples"], 25);
    assert_eq!(json["overall"]["success_rate"], 19.0 / 25.0);
    assert!(json["audit"].is_array());

    let name = db.name.clone();
    let (md, html, pt) = tokio::task::spawn_blocking(move || {
        let db = TestDb { name };
        (
            report(&db, "md", &[]),
            report(&db, "html", &[]),
            report(&db, "md", &["--lang", "pt-BR"]),
        )
    })
    .await
    .unwrap();
    assert!(
        md.contains("| affiliate_by_id | shadow | 20 | 95.00% | NOT READY for cutover 10%"),
        "{md}"
    );
    assert!(md.contains("| wrong_column | shadow | 5 | 0.00% |"), "{md}");
    assert!(
        md.contains("| name | **"),
        "differing columns in bold:\n{md}"
    );
    assert!(
        pt.contains("# Relatório de divergências do cutover"),
        "{pt}"
    );
    assert!(
        pt.contains("| affiliate_by_id | shadow | 20 | 95.00% | NÃO ESTÁ PRONTO"),
        "{pt}"
    );
    // What is missing, in Portuguese too.
    assert!(
        pt.contains("mais 980 amostras comparadas") && !pt.contains("more compared samples"),
        "{pt}"
    );
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(
        !html.contains('`'),
        "commands set as code, not shown with backticks"
    );
    assert!(
        !html.contains("http://") && !html.contains("https://"),
        "self-contained"
    );
    assert!(html.contains("<svg role=\"img\""), "charts");
    assert!(
        html.contains("<mark>[redacted]</mark>") && !html.contains(">drifted<"),
        "the differing value highlighted, a person's name not shown"
    );
    render_in_chromium(&html);

    // /status: the same, live, for a reader's token (and nothing without one).
    let (status, _) = http_get(proxy.admin.unwrap(), "/status?lang=pt-BR").await;
    assert_eq!(status, 401, "divergence examples need a token");
    let (status, page) = support::http_request(
        proxy.admin.unwrap(),
        "GET",
        "/status?lang=pt-BR",
        Some(READ_TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{page}");
    assert!(page.contains("http-equiv=\"refresh\"") && page.contains("affiliate_by_id"));
}

/// Renders the report in headless Chromium: the rendered text must carry the numbers, and a
/// screenshot is kept in target/ for people to look at.
fn render_in_chromium(html: &str) {
    let chromium = ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|c| {
            Command::new(c)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
        .expect(
            "headless Chromium is needed to render the report: run ./scripts/test (it installs it), or apt install chromium",
        );
    let dir = tempfile::tempdir().unwrap();
    let page = dir.path().join("report.html");
    std::fs::write(&page, html).unwrap();
    let url = format!("file://{}", page.display());
    let flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--user-data-dir",
    ];
    let profile = dir.path().join("profile");
    let dom = Command::new(chromium)
        .args(&flags[..3])
        .arg(format!("{}={}", flags[3], profile.display()))
        .args(["--dump-dom", &url])
        .output()
        .unwrap();
    let dom = String::from_utf8_lossy(&dom.stdout);
    assert!(
        dom.contains("cutover divergence report") && dom.contains("95.00%"),
        "{dom}"
    );
    let shot = Path::new(env!("CARGO_TARGET_TMPDIR")).join("report-screenshot.png");
    let out = Command::new(chromium)
        .args(&flags[..3])
        .arg(format!("{}={}", flags[3], profile.display()))
        .args([
            "--window-size=1200,1600",
            &format!("--screenshot={}", shot.display()),
            &url,
        ])
        .output()
        .unwrap();
    let size = std::fs::metadata(&shot).map(|m| m.len()).unwrap_or(0);
    assert!(
        size > 10_000,
        "no screenshot ({size} bytes): {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_window_and_an_unreachable_database() {
    let db = support::migrated_db().await;
    let name = db.name.clone();
    let (json, md) = tokio::task::spawn_blocking(move || {
        let db = TestDb { name };
        (report(&db, "json", &[]), report(&db, "md", &[]))
    })
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(json["overall"]["samples"], 0);
    assert!(json["overall"]["success_rate"].is_null());
    assert!(md.contains("No comparisons in this window"), "{md}");

    let (code, _, err) = tokio::task::spawn_blocking(|| {
        cutover(
            &[
                "report",
                "--database-url",
                "postgres://nobody@127.0.0.1:1/x",
                "--format",
                "md",
            ],
            &[],
        )
    })
    .await
    .unwrap();
    assert_eq!(code, 2);
    assert!(
        err.starts_with("error: ") && err.contains("127.0.0.1:1"),
        "{err}"
    );

    // A database cutover never migrated.
    let bare = support::empty_db().await;
    let url = bare.url();
    let (code, _, err) = tokio::task::spawn_blocking(move || {
        cutover(&["report", "--database-url", &url, "--format", "json"], &[])
    })
    .await
    .unwrap();
    assert_eq!(code, 2);
    assert!(err.contains("cutover migrate"), "{err}");
}

/// Why a query type is not ready, next to its verdict (issue 20, item 8): the backfill
/// quarantined orphans, so v2 counts fewer active affiliates than legacy; the verdict says
/// the quarantined rows explain the difference, in English and in Portuguese, and the last
/// verify's line has no English words in the Portuguese report.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quarantined_orphans_explain_a_count_difference_next_to_the_verdict() {
    use cutover::demo::fixture::{self, TreeSpec};
    let db = support::migrated_db().await;
    let direct = db.client().await;
    fixture::load(
        &direct,
        &TreeSpec {
            affiliates: 300,
            seed: 11,
            orphans: 4,
            cycle_len: 0,
            drifted_counters: 0,
            shuffle_ids: false,
        },
    )
    .await
    .unwrap();
    let _ = support::cutover_on(&db, "backfill", &[], &[]);
    let quarantined: i64 = direct
        .query_one("SELECT count(*) FROM cutover.backfill_quarantine", &[])
        .await
        .unwrap()
        .get(0);
    let active_quarantined: i64 = direct
        .query_one(
            "SELECT count(*) FROM affiliates a
             WHERE a.status = 'active' AND NOT EXISTS (
                 SELECT 1 FROM fature_v2.affiliates_optimized o WHERE o.affiliate_id = a.affiliate_id)",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert!(
        quarantined >= 4 && active_quarantined > 0,
        "the fixture's seed must quarantine active rows: {quarantined}, {active_quarantined}"
    );
    let _ = support::cutover_on(&db, "verify", &[], &[]);

    let rules = support::rules_with(&[("count_active", "stage = \"shadow\"")], "");
    let proxy = support::proxy_on(&db, &rules, |_| {}).await;
    let app = proxy.client(&db.name).await;
    for _ in 0..5 {
        app.simple_query("SELECT COUNT(*) FROM affiliates WHERE status = 'active'")
            .await
            .unwrap();
    }
    counted(&direct, 5).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let name = db.name.clone();
    let (json, pt) = tokio::task::spawn_blocking(move || {
        let db = TestDb { name };
        (
            report(&db, "json", &[]),
            report(&db, "md", &["--lang", "pt-BR"]),
        )
    })
    .await
    .unwrap();
    let json: serde_json::Value = serde_json::from_str(&json).unwrap();
    let count = query_type(&json, "count_active");
    assert_eq!(count["verdict"]["ready"], false, "{count}");
    let cause = count["verdict"]["causes"][0].as_str().unwrap_or_default();
    assert!(
        cause.contains(&format!(
            "the backfill set {quarantined} legacy rows aside (orphans, cycles) that v2 does not have, and the answers differ by {active_quarantined}"
        )),
        "{count}"
    );
    assert!(
        pt.contains(&format!(
            "o backfill separou {quarantined} linhas do legado (órfãs, ciclos) que o v2 não tem, e as respostas diferem em {active_quarantined}"
        )),
        "{pt}"
    );
    let verify = pt
        .lines()
        .find(|l| l.contains("Última verificação"))
        .unwrap_or_else(|| panic!("{pt}"));
    assert!(verify.contains("linhas no legado"), "{verify}");
    for english in ["legacy", "rows", "missing", "failed checks", "quarantined"] {
        assert!(!verify.contains(english), "{english:?} in {verify}");
    }
    proxy.shutdown().await;
}
