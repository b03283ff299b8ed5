//! The admin console as a PostgreSQL endpoint (issue 20, item 3): SCRAM logins (with channel
//! binding over TLS), the simple and extended protocols, every command, from psql, psycopg,
//! JDBC and tokio-postgres; PAUSE holding new transactions at a boundary until RESUME.

mod support;

use std::{path::Path, process::Command, time::Duration};

use support::{Proxy, TestDb, migrated_db, proxy_with};
use tokio_postgres::{NoTls, SimpleQueryMessage, error::SqlState};

const TOKEN: &str = "console-token-0123456789";
const READ_TOKEN: &str = "viewer-token-0123456789";

struct Certificate {
    _dir: tempfile::TempDir,
    cert: std::path::PathBuf,
    key: std::path::PathBuf,
}

fn certificate() -> Certificate {
    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = dir.path().join("proxy.crt");
    let key = dir.path().join("proxy.key");
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    Certificate {
        _dir: dir,
        cert,
        key,
    }
}

async fn console_proxy(db: &TestDb, tls: Option<&Certificate>, rules: Option<&Path>) -> Proxy {
    let url = db.url();
    let tls = tls.map(|c| (c.cert.clone(), c.key.clone()));
    let rules = rules.map(Path::to_path_buf);
    proxy_with(move |c| {
        c.control = Some(url);
        c.admin_tokens = Some([("ops".to_owned(), TOKEN.to_owned())].into_iter().collect());
        c.read_tokens = Some(
            [("viewer".to_owned(), READ_TOKEN.to_owned())]
                .into_iter()
                .collect(),
        );
        if let Some((cert, key)) = tls {
            c.tls_cert = Some(cert);
            c.tls_key = Some(key);
        }
        if let Some(rules) = rules {
            c.rules = Some(rules);
        }
    })
    .await
}

async fn psql(p: &Proxy, user: &str, password: &str, extra: &str, sql: &str) -> (bool, String) {
    support::console_psql(p, user, password, extra, sql).await
}

/// Runs a client program to its end; its standard output (the test fails, with both
/// outputs, if it failed).
async fn succeeded(mut program: Command) -> String {
    let out = tokio::task::spawn_blocking(move || program.output().unwrap())
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

async fn console_client(p: &Proxy, user: &str, password: &str) -> tokio_postgres::Client {
    let mut config = p.config(cutover::admin::console::DATABASE);
    config.user(user).password(password);
    let (client, connection) = config.connect(NoTls).await.expect("console login");
    tokio::spawn(connection);
    client
}

/// The rows of a simple query, each value as text.
async fn rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_logs_in_with_scram_and_every_command_answers() {
    let db = migrated_db().await;
    let cert = certificate();
    let p = console_proxy(&db, Some(&cert), None).await;

    // SHOW HELP lists every command.
    let (ok, out) = psql(&p, "ops", TOKEN, "", "SHOW HELP").await;
    assert!(ok, "{out}");
    for command in [
        "SHOW QUERY_TYPES",
        "SHOW STATS",
        "SHOW CLIENTS",
        "SHOW CONFIG",
        "SHOW VERSION",
        "SHOW HISTORY",
        "SHOW CHANGES",
        "SHOW MARKS",
        "SET STAGE",
        "ACCEPT",
        "MARK",
        "RELOAD",
        "PAUSE",
        "RESUME",
    ] {
        assert!(
            out.lines().any(|l| l.starts_with(command)),
            "{command} not in SHOW HELP:\n{out}"
        );
    }

    // Over TLS the login binds the channel (SCRAM-SHA-256-PLUS on the proxy's certificate).
    let (ok, out) = psql(
        &p,
        "ops",
        TOKEN,
        "sslmode=require&channel_binding=require",
        "SHOW VERSION",
    )
    .await;
    assert!(ok && out.contains("cutover "), "{out}");

    // Wrong tokens and unknown users are refused alike.
    for (user, password) in [("ops", "not-the-token-0000"), ("nobody", TOKEN)] {
        let (ok, out) = psql(&p, user, password, "", "SHOW HELP").await;
        assert!(
            !ok && out.contains(&format!(
                "password authentication failed for console user \"{user}\""
            )),
            "{out}"
        );
    }

    // The configuration in effect, without secrets.
    let (ok, out) = psql(&p, "ops", TOKEN, "", "SHOW CONFIG").await;
    assert!(ok, "{out}");
    assert!(
        out.contains("admin_tokens|ops (tokens not shown)|RELOAD"),
        "{out}"
    );
    assert!(out.contains("rules|"), "{out}");
    assert!(!out.contains(TOKEN) && !out.contains(READ_TOKEN), "{out}");

    // A divergence class marked as expected, read back; a read token reads but changes
    // nothing; a bad mark says what is wrong.
    let mark = "MARK top_referrers KIND drift COLUMNS level_1_referrals CLASS counter_drift NOTE 'legacy drifted, it''s known'";
    let (ok, out) = psql(&p, "ops", TOKEN, "", mark).await;
    assert!(ok && out.contains("MARK"), "{out}");
    let (ok, out) = psql(&p, "viewer", READ_TOKEN, "", "SHOW MARKS").await;
    assert!(
        ok && out.contains(
            "top_referrers|drift|level_1_referrals|counter_drift|legacy drifted, it's known|ops|"
        ),
        "{out}"
    );
    let (ok, out) = psql(&p, "viewer", READ_TOKEN, "", mark).await;
    assert!(!ok && out.contains("read token"), "{out}");
    let bad = "MARK top_referrers KIND sideways COLUMNS a CLASS c NOTE 'n'";
    let (ok, out) = psql(&p, "ops", TOKEN, "", bad).await;
    assert!(!ok && out.contains("is not one of drift"), "{out}");

    // The first error ends a query string, as in PostgreSQL.
    let never = "SHOW VERSION; SHOW NOTHING; MARK t KIND drift COLUMNS a CLASS never NOTE 'n'";
    let (ok, out) = psql(&p, "ops", TOKEN, "", never).await;
    assert!(!ok && out.contains("does not know this command"), "{out}");
    let (_, out) = psql(&p, "ops", TOKEN, "", "SHOW MARKS").await;
    assert!(!out.contains("never"), "{out}");

    // The behaviour changes the rules declare, and a reviewer's acceptance.
    let (ok, out) = psql(&p, "ops", TOKEN, "", "ACCEPT no_such_change REASON 'x'").await;
    assert!(!ok && out.contains("SHOW CHANGES lists them"), "{out}");
    let rules = cutover::routing::rules::RuleSet::load_dir(
        &Path::new(env!("CARGO_MANIFEST_DIR")).join("rules"),
    )
    .unwrap();
    let change = &rules.behaviour_changes[0].name;
    let (ok, out) = psql(
        &p,
        "ops",
        TOKEN,
        "",
        &format!("ACCEPT {change} REASON 'reviewed on the console'"),
    )
    .await;
    assert!(ok, "{out}");
    let (ok, out) = psql(&p, "ops", TOKEN, "", "SHOW CHANGES").await;
    assert!(
        ok && out.lines().any(
            |l| l.starts_with(&format!("{change}|")) && l.ends_with("|reviewed on the console")
        ),
        "{out}"
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_and_stats_show_what_the_application_does() {
    let db = migrated_db().await;
    let p = console_proxy(&db, None, None).await;
    let mut app = p.config(&db.name);
    app.application_name("billing-worker");
    let (app, connection) = app.connect(NoTls).await.unwrap();
    tokio::spawn(connection);
    for _ in 0..3 {
        app.query("SELECT * FROM affiliates WHERE affiliate_id = $1", &[&1i64])
            .await
            .unwrap();
    }

    let console = console_client(&p, "ops", TOKEN).await;
    let clients = rows(&console, "SHOW CLIENTS").await;
    let worker = clients
        .iter()
        .find(|r| r[4].as_deref() == Some("billing-worker"))
        .unwrap_or_else(|| panic!("{clients:?}"));
    assert_eq!(worker[1].as_deref(), Some("app"));
    assert_eq!(worker[3].as_deref(), Some(db.name.as_str()));
    assert_eq!(worker[7].as_deref(), Some("idle"));
    assert!(worker[10].as_deref().unwrap().parse::<u64>().unwrap() >= 3);
    assert!(
        clients.iter().any(|r| r[1].as_deref() == Some("console")),
        "{clients:?}"
    );

    // The extended protocol with binary results (tokio-postgres asks for them).
    let stats = console.query("SHOW STATS", &[]).await.unwrap();
    let by_id = stats
        .iter()
        .find(|r| r.get::<_, String>("query_type") == "affiliate_by_id")
        .expect("a line per named query type");
    // The metrics are the process's: other tests of this binary may count too.
    assert!(by_id.get::<_, i64>("served_legacy") >= 3);
    assert_eq!(by_id.get::<_, i64>("served_target"), 0);

    // $n parameters, sent in binary.
    console
        .execute(
            "SET STAGE $1 shadow REASON $2",
            &[&"affiliate_by_id", &"compare it"],
        )
        .await
        .unwrap();
    let err = console
        .execute("SET STAGE $1 shadow REASON $2", &[&"nope", &"x"])
        .await
        .unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::UNDEFINED_OBJECT), "{err}");
    let history = rows(&console, "SHOW HISTORY").await;
    assert_eq!(history[0][1].as_deref(), Some("affiliate_by_id"));
    assert_eq!(history[0][6].as_deref(), Some("compare it"));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_reads_the_rules_again_and_says_what_is_wrong() {
    let db = migrated_db().await;
    let rules = support::rules_with(&[], "");
    let p = console_proxy(&db, None, Some(rules.path())).await;
    let console = console_client(&p, "ops", TOKEN).await;
    let reloaded = rows(&console, "RELOAD").await;
    assert_eq!(reloaded[1][0].as_deref(), Some("rules"));
    assert!(
        reloaded[1][1].as_deref().unwrap().ends_with("query types"),
        "{reloaded:?}"
    );

    std::fs::write(
        rules.path().join("broken.toml"),
        "[[query_type]]\nname = 3\n",
    )
    .unwrap();
    let err = console.simple_query("RELOAD").await.unwrap_err();
    let db_error = err.as_db_error().expect("an error from the console");
    assert_eq!(db_error.code(), &SqlState::CONFIG_FILE_ERROR);
    assert!(
        db_error.message().contains("broken.toml:"),
        "{}",
        db_error.message()
    );
    // The session goes on.
    assert_eq!(
        rows(&console, "SELECT 1").await,
        vec![vec![Some("1".into())]]
    );
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_holds_new_transactions_and_resume_releases_them() {
    let db = migrated_db().await;
    let p = console_proxy(&db, None, None).await;
    let app = |name: &'static str| {
        let mut config = p.config(&db.name);
        config.application_name(name);
        async move {
            let (client, connection) = config.connect(NoTls).await.unwrap();
            tokio::spawn(connection);
            client
        }
    };
    let in_transaction = app("in-transaction").await;
    let idle = app("idle").await;
    in_transaction
        .batch_execute("BEGIN; SELECT count(*) FROM affiliates")
        .await
        .unwrap();

    let console = console_client(&p, "ops", TOKEN).await;
    let pausing = tokio::spawn(async move {
        console.simple_query("PAUSE").await.unwrap();
        console
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !pausing.is_finished(),
        "PAUSE returned while a session was inside a transaction"
    );

    // A session between transactions is held: its query waits.
    let held = tokio::spawn(async move {
        idle.query_one("SELECT 42", &[])
            .await
            .unwrap()
            .get::<_, i32>(0)
    });
    // The open transaction goes on to its end.
    in_transaction
        .batch_execute("INSERT INTO affiliates (external_id, name, registration_date) VALUES ('paused-1', 'x', now()); COMMIT")
        .await
        .unwrap();
    let console = tokio::time::timeout(Duration::from_secs(10), pausing)
        .await
        .expect("PAUSE returns once no session is inside a transaction")
        .unwrap();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!held.is_finished(), "a new transaction ran while paused");
    let states: Vec<_> = rows(&console, "SHOW CLIENTS")
        .await
        .into_iter()
        .map(|r| (r[4].clone().unwrap(), r[7].clone().unwrap()))
        .collect();
    assert!(
        states.contains(&("idle".into(), "held by PAUSE".into())),
        "{states:?}"
    );
    // The session whose transaction ended is held too at its next one.
    let next = tokio::spawn(async move {
        in_transaction
            .query_one("SELECT 7", &[])
            .await
            .unwrap()
            .get::<_, i32>(0)
    });

    rows(&console, "RESUME").await;
    let released = tokio::time::timeout(Duration::from_secs(10), held)
        .await
        .expect("RESUME releases the held session")
        .unwrap();
    assert_eq!(released, 42);
    assert_eq!(next.await.unwrap(), 7);
    let paused = support::metric(&p.metrics().await, "cutover_paused");
    assert_eq!(paused, 0.0);
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_uses_the_console_with_the_extended_protocol() {
    let found = Command::new("python3")
        .args(["-c", "import psycopg"])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "psycopg is not installed: run ./scripts/test (it installs the clients), or python3 -m pip install 'psycopg[binary]'"
    );
    let db = migrated_db().await;
    let p = console_proxy(&db, None, None).await;
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/console_psycopg.py");
    let url = format!("postgres://ops:{TOKEN}@127.0.0.1:{}/cutover", p.addr.port());
    let mut python = Command::new("python3");
    python.arg(script).arg(url);
    let stdout = succeeded(python).await;
    for line in [
        r#"["columns", ["query_type", "stage", "percent", "dual_write", "source", "updated_at"]]"#,
        r#"["percent type", "int"]"#,
        r#"["mark", "MARK"]"#,
        r#"["marks", "from psycopg, it's here"]"#,
        r#"["unknown", "42704"]"#,
        r#"["set stage", "SET STAGE"]"#,
        r#"["stats columns", ["query_type", "served_legacy", "served_target"]]"#,
        r#"["stats has", true]"#,
        r#"["pipeline", true, 1]"#,
        r#"["unknown command", "42601"]"#,
        r#"["resume notice", ["cutover was not paused"]]"#,
        r#"["rollback notice", ["the cutover console has no transactions: the 1 change(s) made since BEGIN stay"]]"#,
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "{line} not in:\n{stdout}"
        );
    }
    let history = rows(&console_client(&p, "ops", TOKEN).await, "SHOW HISTORY").await;
    assert_eq!(history[0][6].as_deref(), Some("psycopg, with 'quotes'"));
    p.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_uses_the_console() {
    let jar = "/usr/share/java/postgresql.jar";
    assert!(
        Path::new(jar).exists(),
        "the PostgreSQL JDBC driver is not installed: run ./scripts/test (it installs the clients), or apt install libpostgresql-jdbc-java"
    );
    let db = migrated_db().await;
    let p = console_proxy(&db, None, None).await;
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients/ConsoleJdbc.java");
    let url = format!("jdbc:postgresql://127.0.0.1:{}/cutover", p.addr.port());
    let mut java = Command::new("java");
    java.args(["-cp", jar])
        .arg(source)
        .args([url.as_str(), "ops", TOKEN]);
    let stdout = succeeded(java).await;
    for line in [
        "columns\tquery_type,percent int8",
        "query types\ttrue",
        "mark\tok",
        "set stage\tok",
        "clients\ttrue",
        "stats\tfloat8",
        "marks\tfrom JDBC",
        "error\t42601",
        "valid\ttrue",
        "isolation\ttrue",
        "product\tPostgreSQL 15",
    ] {
        assert!(
            stdout.lines().any(|l| l == line),
            "{line} not in:\n{stdout}"
        );
    }
    assert!(stdout.starts_with("version\tcutover "), "{stdout}");
    p.shutdown().await;
}
