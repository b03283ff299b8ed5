//! The control plane: stages changed live through the admin API of any replica, applied by
//! every replica, audited, behind a bearer token and the safety gate; a replica that loses
//! the control database serves on and catches up.

mod support;

use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Proxy, TestDb, http_request, migrated_db, proxy_with};

const TOKEN: &str = "test-token-0123456789";
/// A token that may read the state and the evidence but change nothing.
const READ_TOKEN: &str = "read-token-0123456789";

async fn replica(db: &TestDb) -> Proxy {
    let url = db.url();
    proxy_with(move |c| {
        c.control = Some(url);
        c.admin_tokens = Some([("ops".to_owned(), TOKEN.to_owned())].into_iter().collect());
        c.read_tokens = Some(
            [("viewer".to_owned(), READ_TOKEN.to_owned())]
                .into_iter()
                .collect(),
        );
    })
    .await
}

/// A migrated database whose backfill (of an empty table) has completed: v2 may serve.
async fn backfilled_db() -> TestDb {
    let db = migrated_db().await;
    let (code, out) = support::cutover_on(&db, "backfill", &[], &[]);
    assert_eq!(code, 0, "{out}");
    accept_every_behaviour_change(&db).await;
    db
}

/// The reviewers' acceptance of every behaviour change the repository's rules declare, as
/// SQL would record it (the gate's own test is `a_behaviour_change_holds_the_gate_…`).
async fn accept_every_behaviour_change(db: &TestDb) {
    let rules = cutover::routing::rules::RuleSet::load_dir(std::path::Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/rules"
    )))
    .unwrap();
    let client = db.client().await;
    for c in &rules.behaviour_changes {
        client
            .execute(
                "INSERT INTO cutover.behaviour_acceptances (change, kind, reason, accepted_by, via)
                 VALUES ($1, $2, 'tests of other gates', 'tests', 'sql')",
                &[&c.name, &c.kind.as_str()],
            )
            .await
            .unwrap();
    }
}

/// A reviewer's acceptance of behaviour change `name` through the admin API.
async fn accept(p: &Proxy, name: &str, token: Option<&str>) -> (u16, String) {
    let path = format!("/api/behaviour_changes/{name}/accept");
    let reason = r#"{"reason": "orphans are not customers"}"#;
    http_request(p.admin.unwrap(), "POST", &path, token, Some(reason)).await
}

async fn state(p: &Proxy) -> Value {
    let (status, body) =
        http_request(p.admin.unwrap(), "GET", "/api/state", Some(TOKEN), None).await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

fn stage_of(state: &Value, query_type: &str) -> (String, i64, String) {
    let qt = state["query_types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["query_type"] == query_type)
        .unwrap_or_else(|| panic!("{query_type} not in {state}"));
    (
        qt["stage"].as_str().unwrap().to_owned(),
        qt["percent"].as_i64().unwrap(),
        qt["source"].as_str().unwrap().to_owned(),
    )
}

/// Polls until `done` holds of the replica's state (a functional deadline, not a timing
/// assertion); returns how long it took.
async fn until(p: &Proxy, done: impl Fn(&Value) -> bool) -> Duration {
    let started = Instant::now();
    loop {
        let s = state(p).await;
        if done(&s) {
            return started.elapsed();
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "state never got there: {s}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn set(p: &Proxy, query_type: &str, body: &str, token: Option<&str>) -> (u16, Value) {
    let (status, body) = http_request(
        p.admin.unwrap(),
        "POST",
        &format!("/api/state/{query_type}"),
        token,
        Some(body),
    )
    .await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(Value::String(body)),
    )
}

async fn history(p: &Proxy) -> Vec<Value> {
    let (status, body) = http_request(
        p.admin.unwrap(),
        "GET",
        "/api/history?limit=10",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    serde_json::from_str::<Value>(&body)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_change_through_one_replica_reaches_the_other() {
    let db = migrated_db().await;
    let (a, b) = (replica(&db).await, replica(&db).await);
    for p in [&a, &b] {
        until(p, |s| s["control_connected"] == true).await;
    }
    // Seeded from the rules by whichever replica came first.
    assert_eq!(stage_of(&state(&b).await, "record_deposit").2, "live");

    let (status, changed) = set(
        &a,
        "record_deposit",
        r#"{"stage": "shadow", "reason": "start comparing deposits"}"#,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{changed}");
    assert_eq!(
        (changed["from"].as_str(), changed["to"].as_str()),
        (Some("legacy"), Some("shadow"))
    );
    let took = until(&b, |s| stage_of(s, "record_deposit").0 == "shadow").await;
    eprintln!("the other replica applied the change after {took:?}");

    let audit = history(&b).await;
    let last = &audit[0];
    assert_eq!(last["query_type"], "record_deposit");
    assert_eq!(
        (last["from"].as_str(), last["to"].as_str()),
        (Some("legacy"), Some("shadow"))
    );
    assert_eq!(last["changed_by"], "ops");
    assert_eq!(last["via"], "api");
    assert_eq!(last["reason"], "start comparing deposits");
    assert_eq!(last["forced"], false);
    a.shutdown().await;
    b.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_raise_without_enough_samples_is_refused_and_a_forced_one_recorded() {
    let db = migrated_db().await;
    let p = replica(&db).await;
    until(&p, |s| s["control_connected"] == true).await;
    let (status, _) = set(
        &p,
        "top_referrers",
        r#"{"stage": "shadow", "reason": "compare"}"#,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200);

    // Before a backfill has completed v2 serves nothing, forced or not.
    let (status, refused) = set(
        &p,
        "top_referrers",
        r#"{"stage": "cutover", "percent": 10, "reason": "too early", "force": true}"#,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    let why = refused["error"].as_str().unwrap();
    assert!(
        why.contains("before a backfill has completed (none has run)"),
        "{why}"
    );
    let (code, out) = support::cutover_on(&db, "backfill", &[], &[]);
    assert_eq!(code, 0, "{out}");

    // Then a declared behaviour change it shows (v2 lacks quarantined rows) holds it until a
    // reviewer accepts it.
    let first_step = r#"{"stage": "cutover", "percent": 10, "reason": "first step"}"#;
    let (status, refused) = set(&p, "top_referrers", first_step, Some(TOKEN)).await;
    assert_eq!(status, 409, "{refused}");
    let why = refused["error"].as_str().unwrap();
    assert!(
        why.contains("quarantined_rows_absent")
            && why.contains("no reviewer has accepted it")
            && why.contains("cutover ctl accept"),
        "{why}"
    );
    let admin = p.admin.unwrap();
    let (status, body) =
        http_request(admin, "GET", "/api/behaviour_changes", Some(TOKEN), None).await;
    assert_eq!(status, 200, "{body}");
    let listed: Value = serde_json::from_str(&body).unwrap();
    let names: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "cycle_refused",
            "children_detached_on_delete",
            "quarantined_rows_absent"
        ]
    );
    assert!(
        listed
            .as_array()
            .unwrap()
            .iter()
            .all(|c| c["accepted"].is_null())
    );
    let (status, _) = accept(&p, "quarantined_rows_absent", None).await;
    assert_eq!(status, 401, "a reviewer's token is needed");
    let (status, body) = accept(&p, "no_such_change", Some(TOKEN)).await;
    assert_eq!(status, 404, "{body}");
    let (status, body) = accept(&p, "quarantined_rows_absent", Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    let accepted: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(accepted["accepted"]["accepted_by"], "ops");
    assert_eq!(accepted["accepted"]["reason"], "orphans are not customers");

    let (status, refused) = set(&p, "top_referrers", first_step, Some(TOKEN)).await;
    assert_eq!(status, 409, "{refused}");
    let why = refused["error"].as_str().unwrap();
    assert!(
        why.contains("0 compared samples") && why.contains("need 1000") && why.contains("95%"),
        "{why}"
    );
    // (the change to shadow reaches this replica's state through the feed, not at once)
    until(&p, |s| stage_of(s, "top_referrers").0 == "shadow").await;

    let (status, forced) = set(
        &p,
        "top_referrers",
        r#"{"stage": "cutover", "percent": 10, "reason": "load test window", "force": true}"#,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{forced}");
    assert_eq!(forced["forced"], true);
    until(&p, |s| {
        stage_of(s, "top_referrers") == ("cutover".into(), 10, "live".into())
    })
    .await;
    assert_eq!(history(&p).await[0]["forced"], true);
    // The share served by the target is exported per query type (the value is per process,
    // shared by this binary's proxies: only its presence is checked here).
    assert!(
        p.metrics()
            .await
            .contains(r#"cutover_stage_percent{query_type="top_referrers"}"#)
    );

    // Stepping back needs no evidence.
    let (status, back) = set(
        &p,
        "top_referrers",
        r#"{"stage": "shadow", "reason": "roll back"}"#,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{back}");
    assert_eq!(back["forced"], false);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changes_need_the_token_and_a_valid_request() {
    let db = migrated_db().await;
    let p = replica(&db).await;
    until(&p, |s| s["control_connected"] == true).await;
    let body = r#"{"stage": "shadow", "reason": "x"}"#;
    // (query type, request, token) → the status the API answers.
    let refused = [
        ("set_status", body, None, 401),
        ("set_status", body, Some("not-the-token-000000"), 401),
        (
            "set_status",
            r#"{"stage": "live", "reason": "x"}"#,
            Some(TOKEN),
            400,
        ),
        (
            "set_status",
            r#"{"stage": "cutover", "reason": "x"}"#,
            Some(TOKEN),
            400,
        ),
        (
            "set_status",
            r#"{"stage": "shadow", "reason": " "}"#,
            Some(TOKEN),
            400,
        ),
        ("set_status", r#"{"stage": "shadow"}"#, Some(TOKEN), 400),
        ("no_such_type", body, Some(TOKEN), 404),
    ];
    for (query_type, request, token, expected) in refused {
        let (status, answer) = set(&p, query_type, request, token).await;
        assert_eq!(
            status, expected,
            "{query_type} {request} {token:?}: {answer}"
        );
    }
    // Nothing of it reached the state or the audit.
    assert_eq!(stage_of(&state(&p).await, "set_status").0, "legacy");
    assert!(history(&p).await.is_empty());
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_that_loses_the_control_database_serves_on_and_catches_up() {
    let db = migrated_db().await;
    let p = replica(&db).await;
    until(&p, |s| s["control_connected"] == true).await;
    let admin = db.client().await;
    let kill = "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity
                WHERE application_name = 'cutover control' AND datname = current_database()";
    let killed: i64 = admin.query_one(kill, &[]).await.unwrap().get(0);
    assert_eq!(killed, 1);
    // A change made meanwhile, by hand in SQL.
    admin
        .batch_execute(
            "UPDATE cutover.query_type_state SET stage = 'shadow' WHERE query_type = 'delete_affiliate'",
        )
        .await
        .unwrap();
    // The application is served all along.
    let app = p.client(&db.name).await;
    let n: i64 = app
        .query_one("SELECT count(*) FROM affiliates", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(n, 0);
    until(&p, |s| {
        s["control_connected"] == true && stage_of(s, "delete_affiliate").0 == "shadow"
    })
    .await;
    p.shutdown().await;
}

/// Runs `cutover ctl --admin ADDR ARGS…` off the runtime's threads; (exit code, stdout+stderr).
async fn ctl(p: &Proxy, args: &[&str], token: Option<&str>) -> (i32, String) {
    let admin = p.admin.unwrap().to_string();
    let mut all = vec!["ctl".to_owned(), "--admin".to_owned(), admin];
    all.extend(args.iter().map(|a| (*a).to_owned()));
    // The read token goes where operators put it: CUTOVER_READ_TOKEN.
    let variable = if token == Some(READ_TOKEN) {
        "CUTOVER_READ_TOKEN"
    } else {
        "CUTOVER_ADMIN_TOKEN"
    };
    let env: Vec<(String, String)> = token
        .map(|t| vec![(variable.to_owned(), t.to_owned())])
        .unwrap_or_default();
    tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = all.iter().map(String::as_str).collect();
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let (code, out, err) = support::cutover(&args, &env);
        (code, format!("{out}{err}"))
    })
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctl_reads_and_changes_the_state_for_people_and_scripts() {
    let db = backfilled_db().await;
    let p = replica(&db).await;
    until(&p, |s| s["control_connected"] == true).await;

    let (code, out) = ctl(&p, &["status"], Some(READ_TOKEN)).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("control database: connected"), "{out}");

    assert!(
        out.lines()
            .any(|l| l.starts_with("count_active") && l.contains("legacy")),
        "{out}"
    );

    // Behaviour changes: listed with their acceptance; accepted again with a new reason.
    let (code, out) = ctl(&p, &["changes"], Some(READ_TOKEN)).await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.lines().any(|l| l.starts_with("cycle_refused")
            && l.contains("refused_cycle")
            && l.contains("tests of other gates")),
        "{out}"
    );
    let (code, out) = ctl(&p, &["accept", "nope", "--reason", "x"], Some(TOKEN)).await;
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no behaviour change \"nope\""), "{out}");
    let (code, out) = ctl(
        &p,
        &["accept", "cycle_refused", "--reason", "v2 is right"],
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert!(
        out.contains("cycle_refused accepted (refused_cycle"),
        "{out}"
    );
    let (code, out) = ctl(&p, &["changes", "--json"], Some(READ_TOKEN)).await;
    assert_eq!(code, 0, "{out}");
    assert!(out.contains(r#""reason": "v2 is right""#), "{out}");

    let (code, out) = ctl(
        &p,
        &[
            "set",
            "count_active",
            "shadow",
            "--reason",
            "compare active counts",
        ],
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(out.trim(), "count_active: legacy → shadow");

    // Refused by the gate: exit 1 with the numbers; forced: recorded.
    let (code, out) = ctl(
        &p,
        &["set", "count_active", "cutover", "10", "--reason", "ramp"],
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("refused") && out.contains("0 compared samples"),
        "{out}"
    );
    let (code, out) = ctl(
        &p,
        &[
            "set",
            "count_active",
            "cutover",
            "10",
            "--reason",
            "ramp",
            "--force",
            "--json",
        ],
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let changed: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(changed["to"], "cutover 10%");
    assert_eq!(changed["forced"], true);

    // Without the token: a clear error, exit 2.
    let (code, out) = ctl(
        &p,
        &["set", "count_active", "shadow", "--reason", "x"],
        None,
    )
    .await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("refused the token"), "{out}");

    let (code, out) = ctl(&p, &["history"], Some(READ_TOKEN)).await;
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[1].contains("count_active")
            && lines[1].contains("shadow → cutover 10%")
            && lines[1].contains("[FORCED]"),
        "{out}"
    );
    assert!(
        lines[2].contains("legacy → shadow") && lines[2].contains("ops (api)"),
        "{out}"
    );
    let (code, out) = ctl(&p, &["history", "--json", "--limit", "1"], Some(READ_TOKEN)).await;
    assert_eq!(code, 0, "{out}");
    assert_eq!(
        serde_json::from_str::<Value>(&out)
            .unwrap()
            .as_array()
            .unwrap()
            .len(),
        1
    );

    // A proxy that is not there: one line that says what to check.
    p.shutdown().await;
    let stopped = Proxy {
        running: None,
        addr: "127.0.0.1:9".parse().unwrap(),
        admin: Some("127.0.0.1:9".parse().unwrap()),
    };
    let (code, out) = ctl(&stopped, &["status"], None).await;
    assert_eq!(code, 2, "{out}");
    assert!(out.contains("cannot reach the admin endpoint"), "{out}");
}

fn rules_copy() -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let from = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules/fature.toml");
    std::fs::copy(from, dir.path().join("fature.toml")).unwrap();
    dir
}

async fn counted(p: &Proxy, query_type: &str) -> f64 {
    support::metric(
        &p.metrics().await,
        &format!(r#"cutover_queries_total{{query_type="{query_type}",served_by="legacy"}}"#),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rules_reload_on_change_and_a_broken_file_keeps_the_last_good_ones() {
    let db = migrated_db().await;
    let rules = rules_copy();
    let dir = rules.path().to_owned();
    let p = proxy_with(move |c| c.rules = Some(dir)).await;
    let app = p.client(&db.name).await;
    let count_active = "SELECT COUNT(*) FROM affiliates WHERE status = 'active'";
    app.batch_execute(count_active).await.unwrap();
    let before = counted(&p, "count_active").await;
    assert!(before >= 1.0);

    // A broken file: nothing changes, the failure is counted.
    let file = rules.path().join("fature.toml");
    let good = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, good.replace("[table]", "[tabel]")).unwrap();
    let failed = r#"cutover_rules_reloads_total{outcome="failed"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while support::metric(&p.metrics().await, failed) < 1.0 {
        assert!(Instant::now() < deadline, "the broken file was not noticed");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.batch_execute(count_active).await.unwrap();
    assert_eq!(counted(&p, "count_active").await, before + 1.0);

    // A good change (the query type renamed): the statement counts under the new name.
    std::fs::write(
        &file,
        // (everywhere: the behaviour changes name it too)
        good.replace(r#""count_active""#, r#""count_active_v2""#),
    )
    .unwrap();
    let ok = r#"cutover_rules_reloads_total{outcome="ok"}"#;
    let deadline = Instant::now() + Duration::from_secs(10);
    while support::metric(&p.metrics().await, ok) < 1.0 {
        assert!(Instant::now() < deadline, "the change was not reloaded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    app.batch_execute(count_active).await.unwrap();
    assert!(counted(&p, "count_active_v2").await >= 1.0);
    p.shutdown().await;
}

#[test]
fn sighup_reloads_the_rules_of_a_running_serve() {
    let rules = rules_copy();
    let admin_port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_cutover"))
        .args([
            "serve",
            "--listen",
            "127.0.0.1:0",
            "--admin",
            &format!("127.0.0.1:{admin_port}"),
        ])
        .args([
            "--upstream",
            &format!(
                "postgres://127.0.0.1:{}/postgres",
                support::cluster().port()
            ),
        ])
        .arg("--rules")
        .arg(rules.path())
        .env("CUTOVER_LOG", "info")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let metrics = || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(support::http_get(
            format!("127.0.0.1:{admin_port}").parse().unwrap(),
            "/metrics",
        ))
        .1
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while std::net::TcpStream::connect(("127.0.0.1", admin_port)).is_err() {
        assert!(Instant::now() < deadline, "serve did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let ok = r#"cutover_rules_reloads_total{outcome="ok"}"#;
    let before = support::metric(&metrics(), ok);
    std::process::Command::new("kill")
        .args(["-HUP", &child.id().to_string()])
        .status()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while support::metric(&metrics(), ok) < before + 1.0 {
        assert!(Instant::now() < deadline, "SIGHUP did not reload");
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// psql on the proxy's console; (success, stdout then stderr).
async fn console(p: &Proxy, user: &str, password: &str, sql: &str) -> (bool, String) {
    support::console_psql(p, user, password, "", sql).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sql_console_works_from_psql() {
    let db = backfilled_db().await;
    let p = replica(&db).await;
    until(&p, |s| s["control_connected"] == true).await;

    let (ok, out) = console(&p, "ops", TOKEN, "SHOW QUERY_TYPES").await;
    assert!(ok, "{out}");
    assert!(
        out.starts_with("query_type|stage|percent|dual_write|source|updated_at"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("top_referrers|legacy|0|isolated|live|")),
        "{out}"
    );

    let (ok, out) = console(
        &p,
        "ops",
        TOKEN,
        "SET STAGE top_referrers shadow REASON 'from psql'",
    )
    .await;
    assert!(ok && out.contains("SET STAGE"), "{out}");
    until(&p, |s| stage_of(s, "top_referrers").0 == "shadow").await;

    // The gate answers in SQLSTATE terms; FORCE goes past it, recorded.
    let (ok, out) = console(
        &p,
        "ops",
        TOKEN,
        "SET STAGE top_referrers cutover 20 REASON 'ramp'",
    )
    .await;
    assert!(!ok && out.contains("0 compared samples"), "{out}");
    let (ok, out) = console(
        &p,
        "ops",
        TOKEN,
        "set stage top_referrers cutover 20 reason 'ramp, it''s fine' force;",
    )
    .await;
    assert!(ok, "{out}");
    let (ok, out) = console(&p, "ops", TOKEN, "SHOW HISTORY").await;
    assert!(ok, "{out}");
    let newest = out.lines().nth(1).unwrap();
    assert!(
        newest.contains("|top_referrers|shadow|cutover 20%|ops|sql|ramp, it's fine|t"),
        "{out}"
    );

    let (ok, out) = console(&p, "ops", TOKEN, "DROP TABLE affiliates").await;
    assert!(!ok && out.contains("does not know this command"), "{out}");
    let (ok, out) = console(&p, "ops", "wrong-password-0000", "SHOW HELP").await;
    assert!(
        !ok && out.contains("password authentication failed"),
        "{out}"
    );
    p.shutdown().await;
}

/// Comparison evidence for a query type in the current minute, as the shadow records it.
async fn evidence(db: &TestDb, query_type: &str, matched: i64, confirmed: i64) {
    db.client()
        .await
        .execute(
            "INSERT INTO cutover.comparison_stats (query_type, minute, matched, confirmed)
             VALUES ($1, date_trunc('minute', now()), $2, $3)
             ON CONFLICT (query_type, minute) DO UPDATE
                 SET matched = EXCLUDED.matched, confirmed = EXCLUDED.confirmed",
            &[&query_type, &matched, &confirmed],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_opens_on_enough_matching_evidence_only() {
    let db = backfilled_db().await;
    let p = replica(&db).await;
    until(&p, |s| s["control_connected"] == true).await;
    let to_shadow = r#"{"stage": "shadow", "reason": "compare"}"#;
    let ramp = r#"{"stage": "cutover", "percent": 10, "reason": "the evidence is in"}"#;
    assert_eq!(set(&p, "upline", to_shadow, Some(TOKEN)).await.0, 200);

    // Enough samples, too many divergences: refused with the rate.
    evidence(&db, "upline", 900, 100).await;
    let (status, refused) = set(&p, "upline", ramp, Some(TOKEN)).await;
    assert_eq!(status, 409, "{refused}");
    assert!(
        refused["error"]
            .as_str()
            .unwrap()
            .contains("1000 compared samples")
            && refused["error"].as_str().unwrap().contains("90.0%"),
        "{refused}"
    );

    // 99% of 1,200: raised, not forced.
    evidence(&db, "upline", 1188, 12).await;
    let (status, raised) = set(&p, "upline", ramp, Some(TOKEN)).await;
    assert_eq!(status, 200, "{raised}");
    assert_eq!(raised["forced"], false);
    // The same change again records nothing new.
    assert_eq!(set(&p, "upline", ramp, Some(TOKEN)).await.0, 200);
    let audit = history(&p).await;
    assert_eq!(
        audit.iter().filter(|e| e["query_type"] == "upline").count(),
        2,
        "{audit:?}"
    );
    p.shutdown().await;
}

/// Latency evidence (histogram buckets of cutover.comparison_stats: ≤ 0.1, 0.2, 0.5, 1, 2,
/// 5 ms, …) for a query type in the current minute: `legacy` and `target` put every sample
/// in one bucket each.
async fn latency(db: &TestDb, query_type: &str, legacy_bucket: usize, target_bucket: usize) {
    let hist = |bucket: usize| {
        let mut h = vec![0i64; 16];
        h[bucket] = 1200;
        h
    };
    db.client()
        .await
        .execute(
            "UPDATE cutover.comparison_stats SET legacy_us_hist = $2, target_us_hist = $3
             WHERE query_type = $1 AND minute = date_trunc('minute', now())",
            &[&query_type, &hist(legacy_bucket), &hist(target_bucket)],
        )
        .await
        .unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gate_refuses_a_target_more_than_twice_as_slow_unless_forced() {
    let db = backfilled_db().await;
    let p = replica(&db).await;
    until(&p, |s| s["control_connected"] == true).await;
    let to_shadow = r#"{"stage": "shadow", "reason": "compare"}"#;
    let ramp = r#"{"stage": "cutover", "percent": 10, "reason": "the evidence is in"}"#;
    assert_eq!(
        set(&p, "top_referrers", to_shadow, Some(TOKEN)).await.0,
        200
    );
    evidence(&db, "top_referrers", 1200, 0).await;

    // Legacy's p99 ≤ 1 ms, v2's ≤ 5 ms: refused, with both numbers.
    latency(&db, "top_referrers", 3, 5).await;
    let (status, refused) = set(&p, "top_referrers", ramp, Some(TOKEN)).await;
    assert_eq!(status, 409, "{refused}");
    let error = refused["error"].as_str().unwrap();
    assert!(
        error.contains("p99 5 ms against legacy's 1 ms"),
        "{refused}"
    );
    // The report's verdict says the same.
    let url = db.url();
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/rules");
    let (code, out, err) = support::cutover(
        &[
            "report",
            "--format",
            "json",
            "--rules",
            rules,
            "--database-url",
            &url,
        ],
        &[],
    );
    assert_eq!(code, 0, "{err}");
    let json: Value = serde_json::from_str(&out).unwrap();
    let row = json["query_types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["query_type"] == "top_referrers")
        .unwrap()
        .clone();
    assert_eq!(row["verdict"]["ready"], false, "{row}");
    assert!(
        row["verdict"]["missing"][0]
            .as_str()
            .unwrap()
            .contains("has 5 ms against 1 ms"),
        "{row}"
    );
    // And it shows why, from both statements' plans (the numbers here are made up; the
    // plans are real, of a tree too small for an index to pay).
    let legacy_plan = row["plans"]["legacy"].as_str().unwrap();
    let target_plan = row["plans"]["target"].as_str().unwrap();
    assert!(
        legacy_plan.contains("Sort") && legacy_plan.contains("Seq Scan on affiliates"),
        "{row}"
    );
    assert!(target_plan.contains("affiliates_optimized"), "{row}");
    // Forced with a reason: raised, and the audit says it was forced.
    let forced =
        r#"{"stage": "cutover", "percent": 10, "reason": "slower but accepted", "force": true}"#;
    let (status, raised) = set(&p, "top_referrers", forced, Some(TOKEN)).await;
    assert_eq!(status, 200, "{raised}");
    assert_eq!(raised["forced"], true);

    // Within 2× (≤ 1 ms against ≤ 2 ms): raised without force.
    latency(&db, "top_referrers", 3, 4).await;
    let further = r#"{"stage": "cutover", "percent": 50, "reason": "as fast"}"#;
    let (status, raised) = set(&p, "top_referrers", further, Some(TOKEN)).await;
    assert_eq!(status, 200, "{raised}");
    assert_eq!(raised["forced"], false);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_query_type_that_starts_diverging_is_ramped_down_by_itself() {
    let db = backfilled_db().await;
    let p = replica(&db).await;
    until(&p, |s| s["control_connected"] == true).await;
    assert_eq!(
        set(
            &p,
            "network_size",
            r#"{"stage": "cutover", "percent": 50, "reason": "load test", "force": true}"#,
            Some(TOKEN)
        )
        .await
        .0,
        200
    );
    // A rewrite bug: one verdict in five is a confirmed divergence.
    evidence(&db, "network_size", 160, 40).await;
    until(&p, |s| stage_of(s, "network_size").0 == "shadow").await;
    let last = &history(&p).await[0];
    assert_eq!(last["query_type"], "network_size");
    assert_eq!(
        (last["changed_by"].as_str(), last["via"].as_str()),
        (Some("auto"), Some("auto"))
    );
    assert!(
        last["reason"]
            .as_str()
            .unwrap()
            .contains("40 confirmed divergences in 200"),
        "{last}"
    );
    assert!(
        p.metrics()
            .await
            .contains(r#"cutover_auto_rampdowns_total{query_type="network_size"}"#)
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_type_moves_on_a_clean_verify_not_on_samples() {
    let db = support::tree_db(100).await;
    accept_every_behaviour_change(&db).await;
    let p = replica(&db).await;
    until(&p, |s| s["control_connected"] == true).await;
    let (status, body) = set(
        &p,
        "set_status",
        r#"{"stage": "shadow", "reason": "dual-write on"}"#,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let raise = r#"{"stage": "target", "reason": "writes v2-first"}"#;
    let (status, body) = set(&p, "set_status", raise, Some(TOKEN)).await;
    assert_eq!(status, 409, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("cutover verify"),
        "{body}"
    );
    // A clean verify opens the gate for writes (and is what the report shows).
    let (code, out) =
        tokio::task::spawn_blocking(move || support::cutover_on(&db, "verify", &[], &[]))
            .await
            .unwrap();
    assert_eq!(code, 0, "{out}");
    let (status, body) = set(&p, "set_status", raise, Some(TOKEN)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["forced"], false);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_behaviour_change_the_rules_do_not_declare_holds_the_gate() {
    let db = migrated_db().await;
    cutover::demo::fixture::load(
        &db.client().await,
        &cutover::demo::fixture::TreeSpec {
            affiliates: 300,
            seed: 21,
            orphans: 2,
            cycle_len: 0,
            drifted_counters: 0,
            shuffle_ids: false,
        },
    )
    .await
    .unwrap();
    let (code, out) = support::cutover_on(&db, "backfill", &[], &[]);
    assert_eq!(code, 1, "orphans quarantined: {out}");
    // The repository's rules without their [[behaviour_change]] declarations.
    let rules = tempfile::tempdir().unwrap();
    let text = include_str!("../rules/fature.toml");
    let undeclared = text.split("\n# Behaviour changes:").next().unwrap();
    assert!(!undeclared.contains("[[behaviour_change]]"));
    std::fs::write(rules.path().join("fature.toml"), undeclared).unwrap();
    let (url, dir) = (db.url(), rules.path().to_owned());
    let p = proxy_with(move |c| {
        c.control = Some(url);
        c.rules = Some(dir);
        c.admin_tokens = Some([("ops".to_owned(), TOKEN.to_owned())].into_iter().collect());
    })
    .await;
    until(&p, |s| s["control_connected"] == true).await;
    let (status, refused) = set(
        &p,
        "top_referrers",
        r#"{"stage": "cutover", "percent": 10, "reason": "first step"}"#,
        Some(TOKEN),
    )
    .await;
    assert_eq!(status, 409, "{refused}");
    let why = refused["error"].as_str().unwrap();
    assert!(
        why.contains("v2 behaved differently 2 times (quarantined_rows)")
            && why.contains("declare no behaviour change"),
        "{why}"
    );
    // The report says so too.
    let url = db.url();
    let report = |format: &str| {
        let dir = rules.path().to_str().unwrap();
        let (code, out, err) = support::cutover(
            &[
                "report",
                "--format",
                format,
                "--rules",
                dir,
                "--database-url",
                &url,
            ],
            &[],
        );
        assert_eq!(code, 0, "{err}");
        out
    };
    let json: Value = serde_json::from_str(&report("json")).unwrap();
    let changes = json["behaviour_changes"].as_array().unwrap();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert_eq!(changes[0]["kind"], "quarantined_rows");
    assert_eq!(changes[0]["observed"], 2);
    assert!(changes[0]["name"].is_null());
    for format in ["md", "html"] {
        let out = report(format);
        assert!(
            out.contains("Behaviour changes") && out.contains("NOT DECLARED in the rules"),
            "{format}: {out}"
        );
    }
    p.shutdown().await;
}

/// The control feed (and the ramp-down and fold loops) log what went wrong, not
/// tokio-postgres's bare "db error" (issue 17, item 7): the server's message and SQLSTATE.
#[tokio::test]
async fn a_database_error_is_logged_with_its_cause() {
    let config = support::cluster().config("no_such_database_here");
    let error = config
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("no such database");
    assert_eq!(error.to_string(), "db error");
    let cause = cutover::net::connect::cause(&error);
    assert!(
        cause.contains("does not exist") && cause.contains("3D000"),
        "{cause}"
    );
}

/// One raw HTTP/1.0 request with the given extra header lines; the whole response.
async fn raw_http(addr: std::net::SocketAddr, method: &str, path: &str, headers: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request =
        format!("{method} {path} HTTP/1.0\r\nHost: x\r\n{headers}Content-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
}

/// The admin surface (issue 17, item 5): divergence examples and the state are read with a
/// token (admin or read-only; Bearer, or Basic as a browser sends it on /status), metrics and
/// health stay open, a read token changes nothing, and wrong tokens are counted and slowed —
/// one at a time, so guessing in parallel goes no faster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_needs_a_token_and_wrong_tokens_are_counted_and_slowed() {
    use base64::Engine;
    let db = migrated_db().await;
    let p = replica(&db).await;
    let admin = p.admin.unwrap();
    for open in ["/metrics", "/healthz"] {
        let response = raw_http(admin, "GET", open, "").await;
        assert!(response.starts_with("HTTP/1.0 200"), "{open}: {response}");
    }
    for guarded in [
        "/api/state",
        "/api/history",
        "/api/behaviour_changes",
        "/status",
    ] {
        let response = raw_http(admin, "GET", guarded, "").await;
        assert!(
            response.starts_with("HTTP/1.0 401"),
            "{guarded}: {response}"
        );
        assert!(
            response
                .to_ascii_lowercase()
                .contains("www-authenticate: basic realm=\"cutover\""),
            "{guarded}: {response}"
        );
        let bearer = raw_http(
            admin,
            "GET",
            guarded,
            &format!("Authorization: Bearer {READ_TOKEN}\r\n"),
        )
        .await;
        assert!(!bearer.starts_with("HTTP/1.0 40"), "{guarded}: {bearer}");
    }
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("anyone:{READ_TOKEN}"));
    let page = raw_http(
        admin,
        "GET",
        "/status",
        &format!("Authorization: Basic {basic}\r\n"),
    )
    .await;
    assert!(
        page.starts_with("HTTP/1.0 200") && page.contains("<!DOCTYPE html>"),
        "{page}"
    );
    // A read token changes nothing.
    let body = r#"{"stage": "shadow", "reason": "try"}"#;
    let (status, refused) = http_request(
        admin,
        "POST",
        "/api/state/affiliate_by_id",
        Some(READ_TOKEN),
        Some(body),
    )
    .await;
    assert_eq!(status, 403, "{refused}");

    // Wrong tokens: three at once are answered one after the other, each after the delay.
    let failures = |text: &str, surface: &str| {
        support::metric(
            text,
            &format!("cutover_admin_auth_failures_total{{surface=\"{surface}\"}}"),
        )
    };
    // The recorder is the process's: other tests of this binary may count too (>=).
    let before = failures(&p.metrics().await, "api");
    let console_before = failures(&p.metrics().await, "console");
    let started = Instant::now();
    let guesses = (0..3).map(|n| {
        let header = format!("Authorization: Bearer guess-{n}-0123456789\r\n");
        async move { raw_http(admin, "GET", "/api/state", &header).await }
    });
    for response in futures_util::future::join_all(guesses).await {
        assert!(response.starts_with("HTTP/1.0 401"), "{response}");
    }
    assert!(
        started.elapsed() >= 3 * cutover::proxy::auth::Throttle::DELAY,
        "three wrong tokens answered in {:?}",
        started.elapsed()
    );
    assert!(failures(&p.metrics().await, "api") - before >= 3.0);

    // The console: a wrong password is counted too.
    let mut config = p.config(cutover::admin::console::DATABASE);
    config.user("ops").password("not-the-token-0123");
    let err = config
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_PASSWORD),
        "{err}"
    );
    assert!(failures(&p.metrics().await, "console") - console_before >= 1.0);
    p.shutdown().await;
}

/// Automatic query types are first-class (issue 18, item 5): a statement no rule names is
/// recorded with its normalized text as soon as the application sends it, can be staged
/// with `cutover ctl` by its id, is then compared by the shadow, shows in the report at the
/// stage it is compared in, takes the rule set's `[[expected]]` classes, and `cutover rules
/// promote` writes it into the rules under a name, its live stage carried over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_automatic_query_type_can_be_seen_staged_and_promoted() {
    let db = support::tree_db(60).await;
    let rules = support::rules_with(
        &[],
        "\n[[expected]]\nclass = \"everyone_s_counter_drift\"\ncolumns = [\"level_1_referrals\"]\nnote = \"legacy's counters drifted, for every query type\"\n",
    );
    let p = support::proxy_on(&db, &rules, |c| {
        c.admin_tokens = Some([("ops".to_owned(), TOKEN.to_owned())].into_iter().collect());
    })
    .await;
    let direct = db.client().await;
    let app = p.client(&db.name).await;
    let sql = "SELECT affiliate_id, level_1_referrals FROM affiliates WHERE parent_affiliate_id = $1 AND status = $2";
    app.query(sql, &[&1i64, &"active"]).await.unwrap();
    let id = cutover::routing::fingerprint::fingerprint(sql).unwrap().id;

    // Seen at `legacy` already, with its text.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let seen = direct
            .query_opt(
                "SELECT normalized FROM cutover.fingerprints WHERE fingerprint = $1",
                &[&id],
            )
            .await
            .unwrap();
        if let Some(row) = seen {
            assert!(row.get::<_, String>(0).contains("parent_affiliate_id = ?"));
            break;
        }
        assert!(Instant::now() < deadline, "{id} never recorded");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Staged by its id, then compared; drift in a column the rule set expects is expected.
    let (code, out) = ctl(
        &p,
        &["set", &id, "shadow", "--reason", "compare it"],
        Some(TOKEN),
    )
    .await;
    assert_eq!(code, 0, "{out}");
    let (code, out) = ctl(
        &p,
        &["set", "fp_0123456789abcdef", "shadow", "--reason", "x"],
        Some(TOKEN),
    )
    .await;
    assert_ne!(code, 0, "an id nobody has seen: {out}");
    until(&p, |s| {
        s["query_types"]
            .as_array()
            .unwrap()
            .iter()
            .any(|q| q["query_type"] == id.as_str())
    })
    .await;
    let parent: i64 = direct
        .query_one(
            "SELECT parent_affiliate_id FROM affiliates WHERE parent_affiliate_id IS NOT NULL
             GROUP BY 1 ORDER BY count(*) DESC LIMIT 1",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    direct
        .batch_execute(&format!(
            "UPDATE affiliates SET level_1_referrals = level_1_referrals + 7 WHERE parent_affiliate_id = {parent}"
        ))
        .await
        .unwrap();
    for _ in 0..3 {
        app.query(sql, &[&parent, &"active"]).await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(20);
    let (compared, expected) = loop {
        let row = direct
            .query_one(
                "SELECT coalesce(sum(matched + confirmed + expected), 0)::int8, coalesce(sum(expected), 0)::int8
                 FROM cutover.comparison_stats WHERE query_type = $1",
                &[&id],
            )
            .await
            .unwrap();
        let (compared, expected): (i64, i64) = (row.get(0), row.get(1));
        if compared >= 3 || Instant::now() > deadline {
            break (compared, expected);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        (compared, expected),
        (3, 3),
        "compared under {id}, drift expected by [[expected]]"
    );

    // The report shows it at the stage it is compared in.
    let (code, report, _) = support::cutover(
        &[
            "report",
            "--format",
            "json",
            "--database-url",
            &db.url(),
            "--rules",
            rules.path().to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{report}");
    let report: Value = serde_json::from_str(&report).unwrap();
    let row = report["query_types"]
        .as_array()
        .unwrap()
        .iter()
        .find(|q| q["query_type"] == id.as_str())
        .unwrap_or_else(|| panic!("{id} not in the report"))
        .clone();
    assert_eq!(row["stage"], "shadow", "{row}");

    // Promoted: the rule is written, the rule set stays valid, the live stage carries over.
    let (code, out, err) = support::cutover(
        &[
            "rules",
            "promote",
            &id,
            "--name",
            "children_by_status",
            "--rules",
            rules.path().to_str().unwrap(),
            "--database-url",
            &db.url(),
        ],
        &[],
    );
    assert_eq!(code, 0, "{out}{err}");
    let set = cutover::routing::rules::RuleSet::load_dir(rules.path()).unwrap();
    let fp = cutover::routing::fingerprint::fingerprint(sql).unwrap();
    assert_eq!(
        set.query_type_for(&fp).map(|q| q.name.as_str()),
        Some("children_by_status")
    );
    let stage: String = direct
        .query_one(
            "SELECT stage FROM cutover.query_type_state WHERE query_type = 'children_by_status'",
            &[],
        )
        .await
        .unwrap()
        .get(0);
    assert_eq!(stage, "shadow");
    // Promoting again is refused: the statement has a name now.
    let (code, out, err) = support::cutover(
        &[
            "rules",
            "promote",
            &id,
            "--name",
            "again",
            "--rules",
            rules.path().to_str().unwrap(),
            "--database-url",
            &db.url(),
        ],
        &[],
    );
    assert_ne!(code, 0, "{out}{err}");
    assert!(err.contains("children_by_status"), "{err}");
    p.shutdown().await;
}
