//! Test harness: one private PostgreSQL cluster per test binary, a template database with
//! the legacy table and every migration applied, and a fresh database per test.
//!
//! The cluster lives in a static for the whole binary; `localpg`'s watchdog stops and
//! removes it when the process ends, even after a panic.
#![allow(dead_code)] // each test binary uses a different part of the harness

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
};

use cutover::{
    config::FileConfig,
    demo::fixture,
    demo::localpg::{LocalPg, Options},
    migrate,
    net::connect,
    serve::{self, Running},
};
use tokio_postgres::{Client, Config};

const TEMPLATE: &str = "cutover_template";

static CLUSTER: OnceLock<LocalPg> = OnceLock::new();
static TEMPLATE_READY: tokio::sync::OnceCell<()> = tokio::sync::OnceCell::const_new();
static NEXT_DB: AtomicUsize = AtomicUsize::new(0);

/// Roles that must authenticate with a password, by method: (role, password, method).
/// Every other role is trusted.
pub const PASSWORD_ROLES: &[(&str, &str, &str)] = &[
    ("md5_user", "md5-secret", "md5"),
    ("scram_user", "scram-secret", "scram-sha-256"),
    ("clear_user", "clear-secret", "password"),
];

/// The binary's cluster, started on first use.
pub fn cluster() -> &'static LocalPg {
    CLUSTER.get_or_init(|| {
        let hba = PASSWORD_ROLES
            .iter()
            .map(|(role, _, method)| format!("host all {role} 127.0.0.1/32 {method}"))
            .collect();
        let pg = LocalPg::start_with(Options {
            hba,
            ..Options::default()
        })
        .unwrap_or_else(|e| panic!("test cluster: {e}"));
        let mut sql = String::new();
        for (role, password, method) in PASSWORD_ROLES {
            let encryption = if *method == "md5" {
                "md5"
            } else {
                "scram-sha-256"
            };
            sql.push_str(&format!(
                "SET password_encryption = '{encryption}'; \
                 CREATE ROLE {role} LOGIN SUPERUSER PASSWORD '{password}';\n"
            ));
        }
        let psql = pg.bindir().join("psql");
        let out = Command::new(psql)
            .args([
                "-X",
                "-q",
                "-v",
                "ON_ERROR_STOP=1",
                "-d",
                &pg.url("postgres"),
                "-c",
                &sql,
            ])
            .output()
            .expect("run psql");
        assert!(
            out.status.success(),
            "create roles: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        pg
    })
}

/// A database of the test cluster.
pub struct TestDb {
    pub name: String,
}

impl TestDb {
    pub fn config(&self) -> Config {
        cluster().config(&self.name)
    }

    pub fn url(&self) -> String {
        cluster().url(&self.name)
    }

    pub async fn client(&self) -> Client {
        connect::connect(&self.config())
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", self.name))
    }
}

/// A superuser connection to the cluster's `postgres` database.
pub async fn admin() -> Client {
    connect::connect(&cluster().config("postgres"))
        .await
        .expect("connect to the test cluster")
}

/// A new database copied from `template`. Nobody may be connected to the template: a
/// connection just closed may take a moment to go, so the copy is retried for up to 5 s.
async fn create_db(template: &str) -> TestDb {
    let name = format!(
        "test_{}_{}",
        std::process::id(),
        NEXT_DB.fetch_add(1, Ordering::Relaxed)
    );
    let admin = admin().await;
    let sql = format!("CREATE DATABASE {name} TEMPLATE {template}");
    for attempt in 0.. {
        match admin.batch_execute(&sql).await {
            Ok(()) => break,
            Err(_) if attempt < 100 => {
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
            Err(e) => panic!("create database {name}: {e}"),
        }
    }
    TestDb { name }
}

/// A new database copied from another test database.
pub async fn clone_db(template: &TestDb) -> TestDb {
    create_db(&template.name).await
}

/// A new database with nothing in it.
pub async fn empty_db() -> TestDb {
    create_db("template0").await
}

/// A new database with the legacy table (empty) and no migration applied.
pub async fn legacy_db() -> TestDb {
    let db = empty_db().await;
    fixture::create_legacy_table(&db.client().await)
        .await
        .expect("create the legacy table");
    db
}

/// A new database with the legacy table (empty) and every migration applied.
pub async fn migrated_db() -> TestDb {
    TEMPLATE_READY
        .get_or_init(|| async {
            admin()
                .await
                .batch_execute(&format!("CREATE DATABASE {TEMPLATE}"))
                .await
                .expect("create the template database");
            let config = cluster().config(TEMPLATE);
            {
                let client = connect::connect(&config)
                    .await
                    .expect("connect to template");
                fixture::create_legacy_table(&client)
                    .await
                    .expect("create the legacy table");
            }
            migrate::run(&config, &migrate::MigrationSet::embedded(), false)
                .await
                .expect("migrate the template database");
        })
        .await;
    create_db(TEMPLATE).await
}

/// A copy of the server installation without one extension's files, for the tests of
/// what happens when an extension is missing. Mirrors the bin, lib and share directories'
/// absolute layout under a temporary root, so the server finds its files relative to
/// itself as it does in the real installation.
pub struct InstallWithout {
    pub root: tempfile::TempDir,
    pub bindir: PathBuf,
}

pub fn install_without_extension(extension: &str) -> InstallWithout {
    let pg_config = |flag: &str| -> PathBuf {
        let out = Command::new(cluster().bindir().join("pg_config"))
            .arg(flag)
            .output()
            .or_else(|_| Command::new("pg_config").arg(flag).output())
            .expect("pg_config runs");
        PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
    };
    let (bindir, sharedir, pkglibdir) = (
        cluster().bindir().to_owned(),
        pg_config("--sharedir"),
        pg_config("--pkglibdir"),
    );
    let root = tempfile::Builder::new()
        .prefix("cutover-pginstall-")
        .tempdir()
        .expect("temp dir");
    let under = |p: &Path| {
        root.path()
            .join(p.strip_prefix("/").expect("absolute path"))
    };

    let new_bin = under(&bindir);
    std::fs::create_dir_all(&new_bin).unwrap();
    for exe in ["postgres", "initdb", "pg_ctl"] {
        // A copy, not a symlink: the server resolves symlinks to find its own location.
        std::fs::copy(bindir.join(exe), new_bin.join(exe)).unwrap();
    }
    let new_lib = under(&pkglibdir);
    if !new_lib.exists() {
        std::fs::create_dir_all(new_lib.parent().unwrap()).unwrap();
        std::os::unix::fs::symlink(&pkglibdir, &new_lib).unwrap();
    }
    let new_share = under(&sharedir);
    std::fs::create_dir_all(new_share.parent().unwrap()).unwrap();
    let status = Command::new("cp")
        .arg("-r")
        .arg(&sharedir)
        .arg(&new_share)
        .status()
        .unwrap();
    assert!(status.success(), "copy {}", sharedir.display());
    for entry in std::fs::read_dir(new_share.join("extension")).unwrap() {
        let entry = entry.unwrap();
        let name = entry.file_name().to_string_lossy().into_owned();
        if name == format!("{extension}.control") || name.starts_with(&format!("{extension}--")) {
            std::fs::remove_file(entry.path()).unwrap();
        }
    }
    // The server runs as the postgres user when the tests run as root.
    Command::new("chmod")
        .args(["-R", "a+rX"])
        .arg(root.path())
        .status()
        .unwrap();
    InstallWithout {
        root,
        bindir: new_bin,
    }
}

/// Runs the `cutover` binary; returns (exit code, stdout, stderr).
pub fn cutover(args: &[&str], env: &[(&str, &str)]) -> (i32, String, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_cutover"));
    cmd.args(args).env_remove("DATABASE_URL");
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run cutover");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A protocol 3.0 StartupMessage for `user` on `database`, as a raw client sends it.
pub fn startup_packet(user: &str, database: &str) -> Vec<u8> {
    let mut body = 196_608u32.to_be_bytes().to_vec();
    for s in ["user", user, "database", database, ""] {
        body.extend_from_slice(s.as_bytes());
        body.push(0);
    }
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

/// A proxy started in-process in front of the test cluster.
pub struct Proxy {
    pub running: Option<Running>,
    pub addr: std::net::SocketAddr,
    pub admin: Option<std::net::SocketAddr>,
}

impl Proxy {
    /// A URL for `dbname` through the proxy, as `user` (no password).
    pub fn url_as(&self, user: &str, dbname: &str) -> String {
        format!("postgres://{user}@127.0.0.1:{}/{dbname}", self.addr.port())
    }

    pub fn url(&self, dbname: &str) -> String {
        self.url_as(cutover::demo::localpg::SUPERUSER, dbname)
    }

    pub fn config(&self, dbname: &str) -> Config {
        let mut config = Config::new();
        config
            .host("127.0.0.1")
            .port(self.addr.port())
            .user(cutover::demo::localpg::SUPERUSER)
            .dbname(dbname);
        config
    }

    pub async fn client(&self, dbname: &str) -> Client {
        connect::connect(&self.config(dbname))
            .await
            .unwrap_or_else(|e| panic!("connect through the proxy: {e}"))
    }

    /// Scrapes /metrics.
    pub async fn metrics(&self) -> String {
        let admin = self.admin.expect("admin endpoint enabled");
        http_get(admin, "/metrics").await.1
    }

    pub async fn shutdown(mut self) {
        if let Some(running) = self.running.take() {
            running.shutdown().await;
        }
    }
}

/// psql on the proxy's admin console as `user` with `password` (`extra` goes into the URL's
/// query); (success, stdout then stderr).
pub async fn console_psql(
    p: &Proxy,
    user: &str,
    password: &str,
    extra: &str,
    sql: &str,
) -> (bool, String) {
    let mut cmd = std::process::Command::new(cluster().bindir().join("psql"));
    cmd.args(["-X", "-A", "-F", "|", "-v", "ON_ERROR_STOP=1", "-c", sql])
        .arg(format!(
            "postgres://{user}@127.0.0.1:{}/{}?{extra}",
            p.addr.port(),
            cutover::admin::console::DATABASE
        ))
        .env("PGPASSWORD", password)
        .env("PGCONNECT_TIMEOUT", "5");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// Starts a proxy with default settings (admin endpoint on a free port).
pub async fn proxy() -> Proxy {
    proxy_with(|_| {}).await
}

pub async fn proxy_with(adjust: impl FnOnce(&mut FileConfig)) -> Proxy {
    let mut file = FileConfig {
        listen: Some("127.0.0.1:0".into()),
        admin: Some("127.0.0.1:0".into()),
        upstream: Some(format!(
            "postgres://127.0.0.1:{}/postgres",
            cluster().port()
        )),
        // Tests end with their clients still open; do not wait for them.
        shutdown_grace_seconds: Some(0),
        rules: Some(std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("rules")),
        ..FileConfig::default()
    };
    adjust(&mut file);
    let running = serve::start(file.validate().expect("valid test config"))
        .await
        .expect("start the proxy");
    Proxy {
        addr: running.addr,
        admin: running.admin_addr,
        running: Some(running),
    }
}

/// A minimal HTTP/1.0 GET; returns (status, body).
pub async fn http_get(addr: std::net::SocketAddr, path: &str) -> (u16, String) {
    http_request(addr, "GET", path, None, None).await
}

/// A minimal HTTP/1.0 request with a JSON body and optional bearer token; returns (status,
/// body).
pub async fn http_request(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr)
        .await
        .expect("admin endpoint");
    let mut request = format!("{method} {path} HTTP/1.0\r\nHost: x\r\n");
    if let Some(token) = token {
        request.push_str(&format!("Authorization: Bearer {token}\r\n"));
    }
    let body = body.unwrap_or("");
    if !body.is_empty() {
        request.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            body.len()
        ));
    }
    request.push_str("\r\n");
    request.push_str(body);
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// One server message read from a raw protocol connection: its tag and body.
pub async fn next_message(s: &mut tokio::net::TcpStream) -> (u8, Vec<u8>) {
    use tokio::io::AsyncReadExt;
    let mut header = [0u8; 5];
    s.read_exact(&mut header).await.unwrap();
    let len = u32::from_be_bytes(header[1..5].try_into().unwrap()) as usize;
    let mut body = vec![0u8; len - 4];
    s.read_exact(&mut body).await.unwrap();
    (header[0], body)
}

/// The value of a metric line (exact labels as rendered), or 0.
pub fn metric(text: &str, series: &str) -> f64 {
    cutover::metrics::scraped(text, series)
}

/// The legacy columns that v2 stores under the same names (all but the derived counter).
pub const SHARED_COLUMNS: &str =
    "affiliate_id, parent_affiliate_id, external_id, name, email, status,
    registration_date, total_deposits, total_bets, total_withdrawals, total_cpa_earned,
    total_rev_earned, total_commissions_paid, created_at, updated_at";

/// Copies every legacy row into fature_v2 through v2's own per-row triggers, parents first.
pub async fn copy_legacy_into_target(client: &Client) {
    client
        .batch_execute(&format!(
            "INSERT INTO fature_v2.affiliates_optimized ({SHARED_COLUMNS})
             SELECT {SHARED_COLUMNS} FROM public.affiliates ORDER BY affiliate_id"
        ))
        .await
        .expect("copy legacy rows through the v2 triggers");
    // Legacy's own counter, carried in v2 for the way back (migration 0014).
    client
        .batch_execute("SELECT cutover.carry_legacy_counters(NULL)")
        .await
        .expect("carry legacy's counters");
}

/// The legacy id sequence's state; sequences ignore rollbacks, so tests that run a write on
/// both sides put it back in between.
pub async fn id_sequence(client: &Client) -> (i64, bool) {
    let row = client
        .query_one(
            "SELECT last_value, is_called FROM public.affiliates_affiliate_id_seq",
            &[],
        )
        .await
        .unwrap();
    (row.get(0), row.get(1))
}

pub async fn restore_id_sequence(client: &Client, (last, called): (i64, bool)) {
    client
        .execute(
            "SELECT setval('public.affiliates_affiliate_id_seq', $1, $2)",
            &[&last, &called],
        )
        .await
        .unwrap();
}

/// Runs `cutover COMMAND --rules <repo rules> --database-url <db> EXTRA…`; returns the exit
/// code and stdout followed by stderr.
pub fn cutover_on(
    db: &TestDb,
    command: &str,
    extra: &[&str],
    env: &[(&str, &str)],
) -> (i32, String) {
    let rules = concat!(env!("CARGO_MANIFEST_DIR"), "/rules");
    let url = db.url();
    let mut args = vec![command, "--rules", rules, "--database-url", url.as_str()];
    args.extend(extra);
    let (code, out, err) = cutover(&args, env);
    (code, format!("{out}{err}"))
}

/// A migrated database with a clean generated tree of `affiliates`, backfilled into v2 (so
/// `cutover verify` is clean).
pub async fn tree_db(affiliates: u64) -> TestDb {
    let db = migrated_db().await;
    cutover::demo::fixture::load(
        &db.client().await,
        &cutover::demo::fixture::TreeSpec::clean(affiliates),
    )
    .await
    .expect("load the generated tree");
    let (code, out) = cutover_on(&db, "backfill", &[], &[]);
    assert_eq!(code, 0, "{out}");
    db
}

/// A rules directory: the repository's rules with `stages` (query type → the TOML lines to
/// add to its rule, e.g. `stage = "shadow"`) and `extra` rules appended.
pub fn rules_with(stages: &[(&str, &str)], extra: &str) -> tempfile::TempDir {
    let mut rules = include_str!("../../rules/fature.toml").to_owned();
    for (name, lines) in stages {
        let at = format!("name = \"{name}\"\n");
        assert!(rules.contains(&at), "{name} is not in the rules");
        rules = rules.replace(&at, &format!("{at}{lines}\n"));
    }
    rules.push_str(extra);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("fature.toml"), rules).unwrap();
    dir
}

/// A proxy whose control database (and so shadow and route checks) is `db`, with the rules
/// of `rules`.
pub async fn proxy_on(
    db: &TestDb,
    rules: &tempfile::TempDir,
    adjust: impl FnOnce(&mut FileConfig),
) -> Proxy {
    let (url, dir) = (db.url(), rules.path().to_owned());
    let proxy = proxy_with(move |c| {
        c.control = Some(url);
        c.rules = Some(dir);
        adjust(c);
    })
    .await;
    // The rules' stages reach the database (and turn dual-write on) when the proxy's control
    // feed has seeded them: tests write only after that.
    let client = db.client().await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while client
        .query_one("SELECT count(*) FROM cutover.query_type_state", &[])
        .await
        .unwrap()
        .get::<_, i64>(0)
        == 0
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the proxy never seeded the live state"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    proxy
}

/// Sets one column of a query type's live state, as an operator's SQL would.
pub async fn set_state(client: &Client, query_type: &str, column: &str, value: &str) {
    client
        .execute(
            &format!(
                "INSERT INTO cutover.query_type_state (query_type, {column}) VALUES ($1, $2)
                 ON CONFLICT (query_type) DO UPDATE SET {column} = EXCLUDED.{column}"
            ),
            &[&query_type, &value],
        )
        .await
        .unwrap();
}

/// The seed's integrity checks and the derived-truth ones (closure, paths, network sizes),
/// every one run and passing, in one snapshot.
pub async fn assert_integrity(client: &Client, when: &str) {
    use cutover::migrate::integrity;
    let results = integrity::run(client).await.expect("integrity checks run");
    let failed: Vec<_> = results.iter().filter(|r| !r.passed()).collect();
    assert!(failed.is_empty(), "{when}: failed checks {failed:#?}");
    assert_eq!(results.len(), integrity::CHECKS.len());
}
