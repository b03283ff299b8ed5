//! Real clients through the proxy, compared with what they get directly: psql, pgbench
//! (and, in tests/clients/, scripts for psycopg, asyncpg, node-postgres and JDBC).

mod support;

use std::{path::Path, process::Command};

use support::{cluster, proxy, proxy_with};

fn bin(name: &str) -> std::path::PathBuf {
    cluster().bindir().join(name)
}

/// Runs a client program off the runtime's threads (the proxy under test runs on them).
async fn run(mut cmd: Command) -> std::process::Output {
    tokio::task::spawn_blocking(move || cmd.output().expect("run a client program"))
        .await
        .unwrap()
}

/// Runs psql on `url` with the script; returns stdout, then stderr.
async fn psql_transcript(url: &str, script: &Path) -> String {
    let mut cmd = Command::new(bin("psql"));
    cmd.args(["-X", "-a", "-f"])
        .arg(script)
        .arg(url)
        .env("PGCLIENTENCODING", "UTF8")
        .stdin(std::process::Stdio::null());
    let out = run(cmd).await;
    format!(
        "{}\n--- stderr ---\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psql_sees_the_same_through_the_proxy() {
    let p = proxy().await;
    let (direct_db, proxied_db) = (support::empty_db().await, support::empty_db().await);
    let dir = tempfile::tempdir().unwrap();
    let input = dir.path().join("copy_input.tsv");
    std::fs::write(&input, "10\tdez\t10.00\n11\tonze\t\\N\n").unwrap();
    let script = dir.path().join("script.sql");
    let text =
        include_str!("clients/psql_script.sql").replace("COPY_INPUT", input.to_str().unwrap());
    std::fs::write(&script, text).unwrap();

    let direct = psql_transcript(&direct_db.url(), &script).await;
    let through = psql_transcript(&p.url(&proxied_db.name), &script).await;
    assert!(
        direct.contains("big_equal") && direct.contains("ERROR:  division by zero"),
        "{direct}"
    );
    assert!(
        direct.contains("NOTICE:  a notice from plpgsql"),
        "{direct}"
    );
    assert!(direct.contains("11\tonze\t\\N"), "{direct}");
    assert_eq!(through, direct);
    p.shutdown().await;
}

async fn pgbench(args: &[&str], port: u16, db: &str) -> String {
    let mut cmd = Command::new(bin("pgbench"));
    cmd.args(args).args([
        "-h",
        "127.0.0.1",
        "-p",
        &port.to_string(),
        "-U",
        "postgres",
        db,
    ]);
    let out = run(cmd).await;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "pgbench {args:?}: {text}");
    text
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pgbench_initializes_and_runs_in_every_protocol_mode() {
    let p = proxy().await;
    let db = support::empty_db().await;
    let port = p.addr.port();
    pgbench(&["-i", "-s", "1", "-q"], port, &db.name).await;
    for mode in ["simple", "extended", "prepared"] {
        for script in ["-S", "-N", "-b tpcb-like"] {
            let mut args = vec!["-M", mode, "-c", "4", "-j", "2", "-t", "100", "-n"];
            args.extend(script.split(' '));
            let out = pgbench(&args, port, &db.name).await;
            assert!(
                out.contains("number of transactions actually processed: 400/400"),
                "{mode} {script}: {out}"
            );
            assert!(!out.contains("number of failed transactions: 1"), "{out}");
        }
    }
    // pgbench's history rows all arrived: 4 clients x 100 tx x 2 writing scripts x 3 modes.
    let client = db.client().await;
    let history: i64 = client
        .query_one("SELECT count(*) FROM pgbench_history", &[])
        .await
        .unwrap()
        .get(0);
    assert_eq!(history, 2400);
    p.shutdown().await;
}

fn self_signed(dir: &Path) -> (std::path::PathBuf, std::path::PathBuf) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()])
        .expect("generate a certificate");
    let (c, k) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&c, cert.cert.pem()).unwrap();
    std::fs::write(&k, cert.signing_key.serialize_pem()).unwrap();
    (c, k)
}

async fn psql_conninfo(url: &str) -> (bool, String) {
    let mut cmd = Command::new(bin("psql"));
    cmd.args(["-X", "-c", "\\conninfo", "-c", "SELECT 42 AS answer", url]);
    let out = run(cmd).await;
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_is_terminated_when_configured_and_declined_otherwise() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = self_signed(dir.path());
    let p = proxy_with(|c| {
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
    })
    .await;
    let (ok, out) = psql_conninfo(&format!("{}?sslmode=require", p.url("postgres"))).await;
    assert!(
        ok && out.contains("SSL connection (protocol: TLSv1.3"),
        "{out}"
    );
    assert!(out.contains("42"), "{out}");
    p.shutdown().await;

    let plain = proxy().await;
    let (ok, out) = psql_conninfo(&format!("{}?sslmode=require", plain.url("postgres"))).await;
    assert!(!ok && out.contains("does not support SSL"), "{out}");
    let (ok, out) = psql_conninfo(&format!("{}?sslmode=prefer", plain.url("postgres"))).await;
    assert!(ok && !out.contains("SSL connection"), "{out}");
    // SCRAM over TLS to the proxy: no -PLUS offered, so libpq does plain SCRAM.
    plain.shutdown().await;
}

/// Runs a scenario program against a fresh database directly and through the proxy, and
/// asserts the two transcripts are equal (and non-trivial).
async fn same_transcript(program: &str, args: &[&str], expect: &[&str]) {
    same_transcript_with(
        program,
        args,
        |port, db| format!("postgres://postgres@127.0.0.1:{port}/{db}"),
        expect,
    )
    .await
}

/// The same, with the URL the program takes for a port and database.
async fn same_transcript_with(
    program: &str,
    args: &[&str],
    url: fn(u16, &str) -> String,
    expect: &[&str],
) {
    let p = proxy().await;
    let (direct_db, proxied_db) = (support::empty_db().await, support::empty_db().await);
    let transcript = |url: String| {
        let mut cmd = Command::new(program);
        cmd.args(args).arg(url);
        async move {
            let out = run(cmd).await;
            let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
            assert!(
                out.status.success(),
                "{program} {args:?} failed:\n{stdout}\n{}",
                String::from_utf8_lossy(&out.stderr)
            );
            stdout
        }
    };
    let direct = transcript(url(cluster().port(), &direct_db.name)).await;
    let through = transcript(url(p.addr.port(), &proxied_db.name)).await;
    for needle in expect {
        assert!(direct.contains(needle), "{needle:?} not in:\n{direct}");
    }
    assert_eq!(through, direct);
    p.shutdown().await;
}

fn clients_dir() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/clients")
}

/// Fails the test with the command to run when a Python driver is missing.
fn python_module(module: &str) {
    let found = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "the Python module {module} is not installed: run ./scripts/test (it installs the clients), or python3 -m pip install 'psycopg[binary]' asyncpg"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn psycopg_sees_the_same_through_the_proxy() {
    python_module("psycopg");
    let script = clients_dir().join("psycopg_scenario.py");
    same_transcript(
        "python3",
        &[script.to_str().unwrap()],
        &[
            "\"pipeline\"",
            "\"copy out\"",
            "\"22012\"",
            "52428800",
            "\"named cursor\"",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn asyncpg_sees_the_same_through_the_proxy() {
    python_module("asyncpg");
    let script = clients_dir().join("asyncpg_scenario.py");
    same_transcript(
        "python3",
        &[script.to_str().unwrap()],
        &[
            "\"copy_records_to_table\"",
            "\"23505\"",
            "\"cursor\"",
            "\"after rollback\", \"um\"",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_postgres_sees_the_same_through_the_proxy() {
    let script = clients_dir().join("node/scenario.js");
    assert!(
        clients_dir().join("node/node_modules/pg").exists(),
        "node-postgres is not installed: run ./scripts/test (it installs the clients), or npm ci --prefix tests/clients/node"
    );
    same_transcript(
        "node",
        &[script.to_str().unwrap()],
        &[
            "[\"cursor\",[[1,2,3,4,5]",
            "\"42P01\"",
            "[\"notice\",\"hi\"]",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jdbc_sees_the_same_through_the_proxy() {
    let jar = "/usr/share/java/postgresql.jar";
    assert!(
        Path::new(jar).exists(),
        "the PostgreSQL JDBC driver is not installed: run ./scripts/test (it installs the clients), or apt install libpostgresql-jdbc-java"
    );
    let source = clients_dir().join("JdbcScenario.java");
    // JDBC takes jdbc:postgresql://host:port/db URLs.
    same_transcript_with(
        "java",
        &["-cp", jar, source.to_str().unwrap()],
        |port, db| format!("jdbc:postgresql://127.0.0.1:{port}/{db}"),
        &[
            "batch\t[1, 1",
            "prepared\t8 8.125",
            "cursor\t1@",
            "error\t23505",
            "multi\t20;count=4;last;",
        ],
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstream_connection_is_encrypted_when_the_url_says_sslmode_require() {
    use cutover::demo::localpg::{LocalPg, Options};
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let pg = LocalPg::start_with(Options {
        settings: vec![
            ("ssl".into(), "on".into()),
            ("ssl_cert_file".into(), "server.crt".into()),
            ("ssl_key_file".into(), "server.key".into()),
        ],
        // This role may only come in over TLS.
        hba: vec![
            "hostssl all tls_only 127.0.0.1/32 trust".into(),
            "host all tls_only 127.0.0.1/32 reject".into(),
        ],
        files: vec![
            ("server.crt".into(), cert.cert.pem().into_bytes()),
            (
                "server.key".into(),
                cert.signing_key.serialize_pem().into_bytes(),
            ),
        ],
        ..Options::default()
    })
    .expect("a TLS-enabled cluster");
    let admin = cutover::net::connect::connect(&pg.config("postgres"))
        .await
        .unwrap();
    admin
        .batch_execute("CREATE ROLE tls_only LOGIN")
        .await
        .unwrap();

    let upstream =
        |mode: &str| format!("postgres://127.0.0.1:{}/postgres?sslmode={mode}", pg.port());
    let proxy_to = |mode: &'static str| {
        let url = upstream(mode);
        async move { proxy_with(move |c| c.upstream = Some(url)).await }
    };

    for mode in ["require", "prefer"] {
        let p = proxy_to(mode).await;
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(p.addr.port())
            .user("tls_only")
            .dbname("postgres");
        let (client, conn) = config
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e}"));
        tokio::spawn(conn);
        let ssl: bool = client
            .query_one(
                "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert!(
            ssl,
            "{mode}: the proxy's connection to the server is encrypted"
        );
        p.shutdown().await;
    }

    // Without TLS the server's own refusal reaches the client, unchanged.
    let p = proxy_to("disable").await;
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(p.addr.port())
        .user("tls_only")
        .dbname("postgres");
    let err = config
        .connect(tokio_postgres::NoTls)
        .await
        .err()
        .expect("refused without TLS");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
        "{err}"
    );
    p.shutdown().await;
}

/// A large answer to a client that reads slowly over TLS arrives whole (issue 17, item 6): the
/// proxy used to write the answer's last TLS records into the TLS session without flushing
/// it, and when the socket could not take them at that moment they stayed there while the
/// relay waited for the server, which had nothing more to say. A raw protocol client over
/// rustls, trusting the proxy's certificate, asks for a 20 MB value and does not read for
/// two seconds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_large_answer_reaches_a_slow_tls_reader_whole() {
    use std::sync::Arc;

    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::{
        TlsConnector,
        rustls::{
            ClientConfig, RootCertStore,
            pki_types::{CertificateDer, ServerName},
        },
    };

    let dir = tempfile::tempdir().unwrap();
    let generated = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, generated.cert.pem()).unwrap();
    std::fs::write(&key, generated.signing_key.serialize_pem()).unwrap();
    let p = proxy_with(|c| {
        c.tls_cert = Some(cert);
        c.tls_key = Some(key);
    })
    .await;

    let mut roots = RootCertStore::empty();
    roots
        .add(CertificateDer::from(generated.cert.der().to_vec()))
        .unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();

    let mut tcp = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    tcp.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f])
        .await
        .unwrap(); // SSLRequest
    let mut answer = [0u8; 1];
    tcp.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"S");
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .unwrap();

    tls.write_all(&support::startup_packet("postgres", "postgres"))
        .await
        .unwrap();
    tls.flush().await.unwrap();

    /// Reads messages until ReadyForQuery; returns (type, body length) of each.
    async fn until_ready<S: AsyncReadExt + Unpin>(s: &mut S) -> Vec<(u8, usize)> {
        let mut seen = Vec::new();
        loop {
            let mut head = [0u8; 5];
            s.read_exact(&mut head).await.unwrap();
            let len = u32::from_be_bytes([head[1], head[2], head[3], head[4]]) as usize - 4;
            let mut body = vec![0u8; len];
            s.read_exact(&mut body).await.unwrap();
            seen.push((head[0], len));
            if head[0] == b'Z' {
                return seen;
            }
        }
    }
    let login = until_ready(&mut tls).await;
    assert!(login.iter().all(|(t, _)| *t != b'E'), "{login:?}");

    let sql = b"SELECT repeat('x', 20000000)\0";
    let mut query = vec![b'Q'];
    query.extend_from_slice(&((4 + sql.len()) as u32).to_be_bytes());
    query.extend_from_slice(sql);
    tls.write_all(&query).await.unwrap();
    tls.flush().await.unwrap();
    // A slow reader all along: 16 KB at a time with a pause, so that the socket is full
    // whenever the proxy writes, its last records included.
    let slow = async {
        let mut got = Vec::new();
        let mut chunk = vec![0u8; 16 * 1024];
        while !got.ends_with(b"Z\0\0\0\x05I") {
            let n = tls.read(&mut chunk).await.unwrap();
            assert!(n > 0, "the proxy closed the connection");
            got.extend_from_slice(&chunk[..n]);
            tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        }
        got
    };
    let got = tokio::time::timeout(std::time::Duration::from_secs(120), slow)
        .await
        .expect("the whole answer within 120 s (it used to stop short and wait forever)");
    let mut answer = Vec::new();
    let mut at = 0;
    while at < got.len() {
        let len = u32::from_be_bytes([got[at + 1], got[at + 2], got[at + 3], got[at + 4]]) as usize;
        answer.push((got[at], len - 4));
        at += 1 + len;
    }
    let row = answer.iter().find(|(t, _)| *t == b'D').expect("a DataRow");
    assert!(row.1 > 20_000_000, "{answer:?}");
    assert!(answer.iter().any(|(t, _)| *t == b'C'), "{answer:?}");
    p.shutdown().await;
}
