//! Logins as managed PostgreSQL has them (issue 17): TLS on the server (`ssl = on`, a
//! certificate from a CA made here), TLS on the proxy, SCRAM and md5 roles that may only
//! come in over TLS, and libpq (psql, psycopg) at each `sslmode` and `channel_binding`.
//! Also the login limits: `authentication_timeout` and logins apart from sessions.

mod support;

use std::{
    path::{Path, PathBuf},
    process::Command,
    sync::OnceLock,
    time::Duration,
};

use cutover::{
    config::FileConfig,
    demo::localpg::{LocalPg, Options},
    serve::{self, Running},
};
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// A CA, and certificates it signs, written as PEM files in a directory that lives as long
/// as the test binary.
struct Pki {
    dir: tempfile::TempDir,
    ca_params: CertificateParams,
    ca_key: KeyPair,
}

impl Pki {
    fn new() -> Self {
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "cutover test CA");
        let ca_key = KeyPair::generate().unwrap();
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("ca.pem"), ca.pem()).unwrap();
        Self {
            dir,
            ca_params,
            ca_key,
        }
    }

    fn ca(&self) -> PathBuf {
        self.dir.path().join("ca.pem")
    }

    /// A certificate for `names`, signed by the CA: (cert PEM, key PEM).
    fn issue(&self, names: &[&str]) -> (String, String) {
        let params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>())
                .unwrap();
        let key = KeyPair::generate().unwrap();
        let issuer = Issuer::from_params(&self.ca_params, &self.ca_key);
        let cert = params.signed_by(&key, &issuer).unwrap();
        (cert.pem(), key.serialize_pem())
    }

    /// The same, as files: (cert path, key path).
    fn issue_files(&self, name: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let (cert, key) = self.issue(names);
        let (c, k) = (
            self.dir.path().join(format!("{name}.crt")),
            self.dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&c, cert).unwrap();
        std::fs::write(&k, key).unwrap();
        (c, k)
    }
}

const ROLES: &[(&str, &str, &str)] = &[
    ("scram_user", "scram-secret", "scram-sha-256"),
    ("md5_user", "md5-secret", "md5"),
];

struct Fixture {
    pki: Pki,
    pg: LocalPg,
    proxy_cert: (PathBuf, PathBuf),
}

static FIXTURE: OnceLock<Fixture> = OnceLock::new();

/// A cluster with `ssl = on` whose certificate names only 127.0.0.1, where the password
/// roles may only log in over TLS.
fn fixture() -> &'static Fixture {
    FIXTURE.get_or_init(|| {
        let pki = Pki::new();
        let (cert, key) = pki.issue(&["127.0.0.1"]);
        let mut hba = Vec::new();
        for (role, _, method) in ROLES {
            hba.push(format!("hostssl all {role} 127.0.0.1/32 {method}"));
            hba.push(format!("host all {role} 127.0.0.1/32 reject"));
        }
        let pg = LocalPg::start_with(Options {
            settings: vec![
                ("ssl".into(), "on".into()),
                ("ssl_cert_file".into(), "server.crt".into()),
                ("ssl_key_file".into(), "server.key".into()),
            ],
            hba,
            files: vec![
                ("server.crt".into(), cert.into_bytes()),
                ("server.key".into(), key.into_bytes()),
            ],
            ..Options::default()
        })
        .expect("a TLS-enabled cluster");
        let mut sql = String::new();
        for (role, password, method) in ROLES {
            let encryption = if *method == "md5" { "md5" } else { "scram-sha-256" };
            sql.push_str(&format!(
                "SET password_encryption = '{encryption}'; CREATE ROLE {role} LOGIN PASSWORD '{password}';\n"
            ));
        }
        let out = Command::new(pg.bindir().join("psql"))
            .args(["-X", "-q", "-v", "ON_ERROR_STOP=1", "-d", &pg.url("postgres"), "-c", &sql])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let proxy_cert = pki.issue_files("proxy", &["localhost", "127.0.0.1"]);
        Fixture {
            pki,
            pg,
            proxy_cert,
        }
    })
}

/// How the proxy authenticates.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Source {
    /// Relays every login.
    None,
    /// `auth_url` + the default `auth_query` (a superuser reads pg_authid).
    Query,
    /// An `auth_file` with the roles' secrets as the server stores them.
    File,
}

async fn start(adjust: impl FnOnce(&mut FileConfig)) -> Running {
    let f = fixture();
    let mut file = FileConfig {
        listen: Some("127.0.0.1:0".into()),
        admin: Some("off".into()),
        upstream: Some(format!("postgres://127.0.0.1:{}/postgres", f.pg.port())),
        shutdown_grace_seconds: Some(0),
        rules: Some(Path::new(env!("CARGO_MANIFEST_DIR")).join("rules")),
        tls_cert: Some(f.proxy_cert.0.clone()),
        tls_key: Some(f.proxy_cert.1.clone()),
        shadow_connections: Some(0),
        ..FileConfig::default()
    };
    adjust(&mut file);
    serve::start(file.validate().expect("valid test config"))
        .await
        .expect("start the proxy")
}

async fn proxy(source: Source) -> Running {
    let f = fixture();
    let auth_file = f.pki.dir.path().join("userlist.txt");
    if source == Source::File {
        let admin = cutover::net::connect::connect(&f.pg.config("postgres"))
            .await
            .unwrap();
        let mut text = String::from("; the roles' secrets, as pg_authid has them\n");
        for (role, _, _) in ROLES {
            let secret: String = admin
                .query_one(
                    "SELECT rolpassword FROM pg_authid WHERE rolname = $1",
                    &[role],
                )
                .await
                .unwrap()
                .get(0);
            text.push_str(&format!("\"{role}\" \"{secret}\"\n"));
        }
        std::fs::write(&auth_file, text).unwrap();
    }
    start(|c| match source {
        Source::None => {}
        // The proxy's own connection, encrypted too.
        Source::Query => c.auth_url = Some(format!("{}?sslmode=require", f.pg.url("postgres"))),
        Source::File => c.auth_file = Some(auth_file),
    })
    .await
}

/// psql through `port` as `user` with libpq `options` (`sslmode=…`); Ok(stdout) or
/// Err(stderr). It prints whether each leg is encrypted: the client's (`\conninfo`) and the
/// proxy's (`pg_stat_ssl` of the server backend).
async fn psql(port: u16, user: &str, password: &str, options: &str) -> Result<String, String> {
    let f = fixture();
    let conninfo = format!(
        "host=127.0.0.1 port={port} dbname=postgres user={user} sslrootcert={} {options}",
        f.pki.ca().display()
    );
    let mut cmd = Command::new(f.pg.bindir().join("psql"));
    cmd.args([
        "-X",
        "-At",
        "-c",
        "\\conninfo",
        "-c",
        "SELECT 'server leg ssl=' || ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
        &conninfo,
    ])
    .env("PGPASSWORD", password)
    .env("PGCONNECT_TIMEOUT", "10");
    let out = tokio::task::spawn_blocking(move || cmd.output().unwrap())
        .await
        .unwrap();
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

fn both_legs_encrypted(out: &str) -> bool {
    out.contains("SSL connection (protocol: TLS") && out.contains("server leg ssl=true")
}

/// With an auth source, SCRAM and md5 logins succeed with TLS on both legs at every client
/// `sslmode` (libpq's defaults too) and `channel_binding` (bound to the proxy's certificate
/// towards the client, to the server's upstream); a wrong password is refused as the server
/// refuses it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_auth_source_logins_work_with_tls_on_both_legs() {
    for source in [Source::Query, Source::File] {
        let p = proxy(source).await;
        let port = p.addr.port();
        for (role, password, method) in ROLES {
            for options in [
                "",
                "sslmode=prefer channel_binding=prefer",
                "sslmode=require",
                "sslmode=verify-full host=localhost",
                "sslmode=verify-ca channel_binding=disable",
                "sslmode=require channel_binding=require",
            ] {
                let outcome = psql(port, role, password, options).await;
                if *method == "md5" && options.contains("channel_binding=require") {
                    // libpq refuses md5 when binding is required, directly as well.
                    let err = outcome.expect_err("md5 cannot bind");
                    assert!(err.contains("channel binding"), "{err}");
                    continue;
                }
                let out = outcome.unwrap_or_else(|e| panic!("{source:?} {role} [{options}]: {e}"));
                assert!(
                    both_legs_encrypted(&out),
                    "{source:?} {role} [{options}]: {out}"
                );
            }
            let err = psql(port, role, "wrong", "sslmode=require")
                .await
                .expect_err("a wrong password");
            assert!(
                err.contains(&format!(
                    "password authentication failed for user \"{role}\""
                )),
                "{err}"
            );
        }
        // psycopg (libpq underneath) at its defaults.
        let script = format!(
            "import psycopg\n\
             with psycopg.connect(host='127.0.0.1', port={port}, dbname='postgres', user='scram_user', password='scram-secret') as c:\n\
             \x20   print(c.pgconn.ssl_in_use, c.execute('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()').fetchone()[0])\n"
        );
        let out = tokio::task::spawn_blocking(move || {
            Command::new("python3")
                .args(["-c", &script])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "True True",
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if source == Source::Query {
            let admin = cutover::net::connect::connect(&fixture().pg.config("postgres"))
                .await
                .unwrap();
            let encrypted: Option<bool> = admin
                .query_one(
                    "SELECT bool_and(s.ssl) FROM pg_stat_ssl s JOIN pg_stat_activity a USING (pid)
                     WHERE a.application_name = 'cutover auth_query'",
                    &[],
                )
                .await
                .unwrap()
                .get(0);
            assert_eq!(
                encrypted,
                Some(true),
                "the auth_query connection runs over TLS"
            );
        }
        p.shutdown().await;
    }
}

/// Without an auth source, logins are relayed: md5 works over TLS on both legs, and SCRAM
/// from a client that could bind is refused by the server as a downgrade — with the cause
/// and the way out, not a puzzle. With binding off it works.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_an_auth_source_a_bindable_scram_login_is_refused_with_the_way_out() {
    let p = proxy(Source::None).await;
    let port = p.addr.port();
    let out = psql(port, "md5_user", "md5-secret", "sslmode=require")
        .await
        .unwrap();
    assert!(both_legs_encrypted(&out), "{out}");
    let err = psql(port, "scram_user", "scram-secret", "sslmode=require")
        .await
        .expect_err("refused");
    assert!(
        err.contains("SCRAM channel binding negotiation error") && err.contains("auth_file"),
        "{err}"
    );
    let out = psql(
        port,
        "scram_user",
        "scram-secret",
        "sslmode=require channel_binding=disable",
    )
    .await
    .unwrap();
    assert!(both_legs_encrypted(&out), "{out}");
    let err = psql(
        port,
        "scram_user",
        "scram-secret",
        "sslmode=require channel_binding=require",
    )
    .await
    .expect_err("libpq requires binding");
    assert!(err.contains("channel binding"), "{err}");
    // libpq's default, sslmode=prefer, tries again without TLS after the refusal, and the
    // relayed login then succeeds on a plain client leg: the downgrade the docs warn of…
    let out = psql(port, "scram_user", "scram-secret", "sslmode=prefer")
        .await
        .unwrap();
    assert!(
        !out.contains("SSL connection") && out.contains("server leg ssl=true"),
        "{out}"
    );
    p.shutdown().await;
    // …which client_tls_required turns into a refusal that says what to do.
    let p = start(|c| c.client_tls_required = Some(true)).await;
    for options in ["sslmode=prefer", "sslmode=disable"] {
        let err = psql(p.addr.port(), "md5_user", "md5-secret", options)
            .await
            .err();
        let expected = if options == "sslmode=prefer" {
            None // over TLS, md5 is fine
        } else {
            Some("TLS connections only")
        };
        match (err, expected) {
            (None, None) => {}
            (Some(err), Some(needle)) => assert!(err.contains(needle), "{options}: {err}"),
            (err, _) => panic!("{options}: {err:?}"),
        }
    }
    let err = psql(
        p.addr.port(),
        "scram_user",
        "scram-secret",
        "sslmode=prefer",
    )
    .await
    .expect_err("no plain retry");
    assert!(err.contains("TLS connections only"), "{err}");
    p.shutdown().await;
}

/// The upstream's certificate is checked as the upstream URL says: `verify-full` against the
/// CA and the host name, `verify-ca` against the CA only; another CA or another name fails
/// the login with the reason.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_upstreams_certificate_is_verified_as_the_url_says() {
    let f = fixture();
    let other_ca = Pki::new();
    let ca = f.pki.ca().display().to_string();
    let url = |host: &str, mode: &str, ca: &str| {
        format!(
            "postgres://{host}:{}/postgres?sslmode={mode}&sslrootcert={ca}",
            f.pg.port()
        )
    };
    for (upstream, ok) in [
        (url("127.0.0.1", "verify-full", &ca), true),
        (url("localhost", "verify-ca", &ca), true),
        (url("localhost", "verify-full", &ca), false),
        (
            url(
                "127.0.0.1",
                "verify-ca",
                &other_ca.ca().display().to_string(),
            ),
            false,
        ),
        (
            url("127.0.0.1", "require", &other_ca.ca().display().to_string()),
            false,
        ),
    ] {
        let p = start(|c| c.upstream = Some(upstream.clone())).await;
        let outcome = psql(p.addr.port(), "md5_user", "md5-secret", "sslmode=require").await;
        match (outcome, ok) {
            (Ok(out), true) => assert!(both_legs_encrypted(&out), "{upstream}: {out}"),
            (Err(err), false) => assert!(
                err.contains("cutover cannot connect") && err.contains("certificate"),
                "{upstream}: {err}"
            ),
            (outcome, _) => panic!("{upstream}: {outcome:?}"),
        }
        p.shutdown().await;
    }
}

/// A raw connection that sends a startup packet and never answers the password request.
async fn stalled_login(port: u16) -> tokio::net::TcpStream {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(&support::startup_packet("md5_user", "postgres"))
        .await
        .unwrap();
    stream
}

/// Reads until the peer closes; what it said.
async fn until_closed(stream: &mut tokio::net::TcpStream) -> String {
    let mut all = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(20), stream.read_to_end(&mut all)).await;
    String::from_utf8_lossy(&all).into_owned()
}

/// Clients that never finish their login neither take authenticated clients' places nor
/// stay for ever: they time out (`authentication_timeout`), and have a limit of their own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logins_that_never_finish_time_out_and_do_not_starve_sessions() {
    let p = start(|c| {
        c.tls_cert = None;
        c.tls_key = None;
        c.upstream = Some(format!(
            "postgres://127.0.0.1:{}/postgres?sslmode=require",
            fixture().pg.port()
        ));
        c.max_client_connections = Some(2);
        c.max_logins_in_progress = Some(3);
        c.authentication_timeout_seconds = Some(3);
    })
    .await;
    let port = p.addr.port();
    let mut stalled = Vec::new();
    for _ in 0..3 {
        stalled.push(stalled_login(port).await);
    }
    // Each got its password request: all three are logging in.
    for s in &mut stalled {
        let mut tag = [0u8; 1];
        s.read_exact(&mut tag).await.unwrap();
        assert_eq!(tag[0], b'R');
    }
    // A fourth login has no place.
    let mut fourth = stalled_login(port).await;
    let said = until_closed(&mut fourth).await;
    assert!(
        said.contains("53300") && said.contains("max_logins_in_progress"),
        "{said}"
    );
    // One stalled login gone: sessions still get in, up to max_client_connections.
    drop(stalled.pop());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let trust = |port: u16| async move {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(port)
            .user("postgres")
            .dbname("postgres");
        config.connect(tokio_postgres::NoTls).await
    };
    let mut sessions = Vec::new();
    for _ in 0..2 {
        let (client, conn) = trust(port)
            .await
            .expect("a session despite the stalled logins");
        tokio::spawn(conn);
        sessions.push(client);
    }
    let err = trust(port).await.err().expect("sessions full");
    assert_eq!(
        err.code(),
        Some(&tokio_postgres::error::SqlState::TOO_MANY_CONNECTIONS),
        "{err}"
    );
    // The stalled logins are closed at the timeout, with the reason.
    for s in &mut stalled {
        let said = until_closed(s).await;
        assert!(
            said.contains("57014") && said.contains("authentication_timeout"),
            "{said}"
        );
    }
    for client in &sessions {
        client
            .simple_query("SELECT 1")
            .await
            .expect("sessions unharmed");
    }
    p.shutdown().await;
}
