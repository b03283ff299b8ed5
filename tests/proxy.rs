//! The proxy with tokio-postgres and raw sockets: what a client gets through it is what it
//! gets from PostgreSQL directly, and every failure has its defined answer.

mod support;

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt, TryStreamExt};
use support::{cluster, metric, proxy, proxy_with};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_postgres::{AsyncMessage, NoTls, SimpleQueryMessage, error::SqlState, types::Type};

async fn simple_rows(client: &tokio_postgres::Client, sql: &str) -> Vec<Vec<Option<String>>> {
    client
        .simple_query(sql)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(row) => Some(
                (0..row.len())
                    .map(|i| row.get(i).map(str::to_owned))
                    .collect(),
            ),
            SimpleQueryMessage::CommandComplete(n) => Some(vec![Some(format!("complete {n}"))]),
            _ => None,
        })
        .collect()
}

#[tokio::test]
async fn simple_and_extended_queries_match_direct() {
    let p = proxy().await;
    let db = support::empty_db().await;
    let direct = db.client().await;
    let through = p.client(&db.name).await;

    let setup = "CREATE TABLE t (id int PRIMARY KEY, n numeric(10,2), at timestamptz,
                     j jsonb, a int[], b bytea, s text);
                 INSERT INTO t VALUES
                     (1, 10.50, '2024-01-02 03:04:05+00', '{\"k\": [1, 2]}', '{1,2,3}', '\\x00ff', 'olá'),
                     (2, NULL, NULL, NULL, NULL, NULL, NULL)";
    direct.batch_execute(setup).await.unwrap();

    let multi =
        "SELECT * FROM t ORDER BY id; SELECT count(*) FROM t; UPDATE t SET s = s WHERE id = 1";
    assert_eq!(
        simple_rows(&through, multi).await,
        simple_rows(&direct, multi).await
    );

    // Extended protocol, binary results, parameters of several types.
    let sql = "SELECT id, n, at, j, a, b, s FROM t WHERE id = ANY($1) ORDER BY id";
    let ids: Vec<i32> = vec![1, 2];
    let a = direct.query(sql, &[&ids]).await.unwrap();
    let b = through.query(sql, &[&ids]).await.unwrap();
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        for i in 0..x.len() {
            let (xv, yv): (Option<&[u8]>, Option<&[u8]>) = (raw(x, i), raw(y, i));
            assert_eq!(xv, yv, "column {i}");
        }
    }

    // Named statements, prepared once and executed many times.
    let stmt = through
        .prepare_typed("SELECT $1::int + 1", &[Type::INT4])
        .await
        .unwrap();
    for i in 0..50 {
        let row = through.query_one(&stmt, &[&i]).await.unwrap();
        assert_eq!(row.get::<_, i32>(0), i + 1);
    }
    p.shutdown().await;
}

/// The raw bytes of a column as the server sent them (binary format).
fn raw(row: &tokio_postgres::Row, i: usize) -> Option<&[u8]> {
    cutover::shadow::compare::raw_column(row, i)
}

#[tokio::test]
async fn errors_arrive_with_every_field_and_the_session_goes_on() {
    let p = proxy().await;
    let db = support::empty_db().await;
    let direct = db.client().await;
    let through = p.client(&db.name).await;
    direct
        .batch_execute("CREATE TABLE u (id int PRIMARY KEY CHECK (id > 0))")
        .await
        .unwrap();
    for sql in [
        "INSERT INTO u VALUES (-1)",
        "SELEC 1",
        "SELECT 1/0",
        "SELECT * FROM missing_table",
    ] {
        let a = direct.batch_execute(sql).await.unwrap_err();
        let b = through.batch_execute(sql).await.unwrap_err();
        let (a, b) = (a.as_db_error().unwrap(), b.as_db_error().unwrap());
        assert_eq!(a.code(), b.code(), "{sql}");
        assert_eq!(a.message(), b.message());
        assert_eq!(a.severity(), b.severity());
        assert_eq!(a.detail(), b.detail());
        assert_eq!(a.constraint(), b.constraint());
        assert_eq!(a.table(), b.table());
        assert_eq!(a.position(), b.position());
        assert_eq!(a.routine(), b.routine());
    }
    // An error inside a transaction, then rollback: same semantics as direct.
    through.batch_execute("BEGIN").await.unwrap();
    assert!(through.batch_execute("SELECT 1/0").await.is_err());
    let err = through.batch_execute("SELECT 1").await.unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::IN_FAILED_SQL_TRANSACTION));
    through.batch_execute("ROLLBACK").await.unwrap();
    assert_eq!(
        simple_rows(&through, "SELECT 7").await[0][0].as_deref(),
        Some("7")
    );
    p.shutdown().await;
}

#[tokio::test]
async fn copy_both_ways_and_a_50_mb_value() {
    let p = proxy().await;
    let db = support::empty_db().await;
    let through = p.client(&db.name).await;
    through
        .batch_execute("CREATE TABLE c (id int, s text)")
        .await
        .unwrap();

    let sink = through.copy_in("COPY c FROM STDIN").await.unwrap();
    futures_util::pin_mut!(sink);
    let mut data = String::new();
    for i in 0..10_000 {
        data.push_str(&format!("{i}\trow {i}\n"));
    }
    sink.send(bytes::Bytes::from(data.clone())).await.unwrap();
    assert_eq!(sink.finish().await.unwrap(), 10_000);

    let out: Vec<bytes::Bytes> = through
        .copy_out("COPY (SELECT * FROM c ORDER BY id) TO STDOUT")
        .await
        .unwrap()
        .try_collect()
        .await
        .unwrap();
    let out: Vec<u8> = out.concat();
    assert_eq!(out, data.as_bytes());

    // 50 MB one way and back, through both the Bind and the DataRow paths.
    let big = "x".repeat(50 << 20);
    let row = through
        .query_one("SELECT length($1::text), $1::text", &[&big])
        .await
        .unwrap();
    assert_eq!(row.get::<_, i32>(0), 50 << 20);
    assert_eq!(row.get::<_, &str>(1).len(), big.len());
    p.shutdown().await;
}

#[tokio::test]
async fn portals_with_row_limits_suspend_and_resume() {
    let p = proxy().await;
    let mut through = p.client("postgres").await;
    let tx = through.transaction().await.unwrap();
    let stmt = tx
        .prepare("SELECT g FROM generate_series(1, 10) g")
        .await
        .unwrap();
    let portal = tx.bind(&stmt, &[]).await.unwrap();
    let mut seen = Vec::new();
    loop {
        let rows = tx.query_portal(&portal, 3).await.unwrap();
        if rows.is_empty() {
            break;
        }
        seen.extend(rows.iter().map(|r| r.get::<_, i32>(0)));
    }
    assert_eq!(seen, (1..=10).collect::<Vec<_>>());
    tx.commit().await.unwrap();
    p.shutdown().await;
}

#[tokio::test]
async fn notifications_and_notices_are_relayed() {
    let p = proxy().await;
    let (listener, mut connection) = p.config("postgres").connect(NoTls).await.unwrap();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            let _ = tx.send(message);
        }
    });
    listener.batch_execute("LISTEN cutover_test").await.unwrap();
    listener
        .batch_execute("DO $$ BEGIN RAISE NOTICE 'hello %', 42; END $$")
        .await
        .unwrap();
    let notifier = cluster().config("postgres").connect(NoTls).await.unwrap();
    tokio::spawn(notifier.1);
    notifier
        .0
        .batch_execute("NOTIFY cutover_test, 'payload'")
        .await
        .unwrap();

    let (mut notice, mut notification) = (None, None);
    let deadline = Instant::now() + Duration::from_secs(10);
    while (notice.is_none() || notification.is_none()) && Instant::now() < deadline {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(AsyncMessage::Notice(n))) => notice = Some(n.message().to_owned()),
            Ok(Some(AsyncMessage::Notification(n))) => {
                notification = Some((n.channel().to_owned(), n.payload().to_owned()))
            }
            _ => {}
        }
    }
    assert_eq!(notice.as_deref(), Some("hello 42"));
    assert_eq!(
        notification,
        Some(("cutover_test".into(), "payload".into()))
    );
    p.shutdown().await;
}

#[tokio::test]
async fn cancel_reaches_the_right_backend() {
    let p = proxy().await;
    let through = p.client("postgres").await;
    let other = p.client("postgres").await;
    let token = through.cancel_token();
    let started = Instant::now();
    let sleeper = tokio::spawn(async move { through.batch_execute("SELECT pg_sleep(30)").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    token.cancel_query(NoTls).await.unwrap();
    let err = sleeper.await.unwrap().unwrap_err();
    assert_eq!(err.code(), Some(&SqlState::QUERY_CANCELED));
    assert!(started.elapsed() < Duration::from_secs(10));
    // The other session was not touched.
    assert_eq!(
        simple_rows(&other, "SELECT 1").await[0][0].as_deref(),
        Some("1")
    );
    let text = p.metrics().await;
    assert!(
        metric(
            &text,
            "cutover_cancel_requests_total{outcome=\"forwarded\"}"
        ) >= 1.0
    );
    p.shutdown().await;
}

#[tokio::test]
async fn password_methods_are_relayed_and_wrong_passwords_get_the_server_error() {
    let p = proxy().await;
    for (role, password, _method) in support::PASSWORD_ROLES {
        let mut config = p.config("postgres");
        config.user(*role).password(*password);
        let (client, conn) = config
            .connect(NoTls)
            .await
            .unwrap_or_else(|e| panic!("{role}: {e}"));
        tokio::spawn(conn);
        let rows = simple_rows(&client, "SELECT current_user").await;
        assert_eq!(rows[0][0].as_deref(), Some(*role));

        config.password("wrong");
        let through = config
            .connect(NoTls)
            .await
            .err()
            .expect("wrong password refused");
        let mut direct_config = cluster().config("postgres");
        direct_config.user(*role).password("wrong");
        let direct = direct_config.connect(NoTls).await.err().unwrap();
        assert_eq!(through.code(), Some(&SqlState::INVALID_PASSWORD), "{role}");
        assert_eq!(
            through.as_db_error().map(|e| e.message()),
            direct.as_db_error().map(|e| e.message())
        );
    }
    p.shutdown().await;
}

/// Connects with a raw socket and completes a trust startup; returns the socket.
async fn raw_session(addr: std::net::SocketAddr) -> tokio::net::TcpStream {
    raw_session_on(addr, "postgres").await
}

/// [`raw_session`] on database `dbname`.
async fn raw_session_on(addr: std::net::SocketAddr, dbname: &str) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
    s.write_all(&support::startup_packet("postgres", dbname))
        .await
        .unwrap();
    // Read until ReadyForQuery.
    let mut seen = Vec::new();
    while !seen.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
        let mut chunk = [0u8; 4096];
        let n = s.read(&mut chunk).await.unwrap();
        assert!(n > 0, "closed during startup");
        seen.extend_from_slice(&chunk[..n]);
    }
    s
}

/// Reads everything until the peer closes; returns the bytes.
async fn read_to_close(s: &mut tokio::net::TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut out)).await;
    out
}

/// The SQLSTATE of the first ErrorResponse in `bytes`.
fn first_error_code(bytes: &[u8]) -> Option<String> {
    let at = bytes.iter().position(|b| *b == b'E')?;
    let fields = cutover::wire::messages::parse_error(&bytes[at + 5..]);
    Some(fields.code)
}

/// A message that arrives in pieces, the rest a while later: the session waits for the socket
/// with part of a frame in its buffer, and its worker serves other sessions meanwhile. (A
/// read that found nothing after all once looped back without waiting while the buffer held
/// part of a frame: the worker spun on it, and every other session on it stood still.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_cut_in_two_waits_without_holding_the_worker() {
    let p = proxy_with(|c| c.worker_threads = Some(1)).await;
    let mut cut = raw_session(p.addr).await;
    let query = query_frame("SELECT 'whole'");
    let (head, tail) = query.split_at(query.len() / 2);
    cut.write_all(head).await.unwrap();
    // The half frame is read (the socket said readable); the rest is not sent yet.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Another session on the same (only) worker is served meanwhile.
    let served = tokio::time::timeout(Duration::from_secs(20), async {
        let other = p.client("postgres").await;
        other
            .query_one("SELECT 2", &[])
            .await
            .unwrap()
            .get::<_, i32>(0)
    })
    .await
    .expect("the other session was served while one waited for the rest of a frame");
    assert_eq!(served, 2);

    cut.write_all(tail).await.unwrap();
    let mut seen = Vec::new();
    while !seen.windows(6).any(|w| w == [b'Z', 0, 0, 0, 5, b'I']) {
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout(Duration::from_secs(20), cut.read(&mut chunk))
            .await
            .expect("the whole message answered")
            .unwrap();
        assert!(n > 0, "closed");
        seen.extend_from_slice(&chunk[..n]);
    }
    assert!(seen.windows(5).any(|w| w == b"whole"));
    p.shutdown().await;
}

/// A simple Query message.
fn query_frame(sql: &str) -> Vec<u8> {
    let mut frame = vec![b'Q'];
    frame.extend_from_slice(&(4 + sql.len() as u32 + 1).to_be_bytes());
    frame.extend_from_slice(sql.as_bytes());
    frame.push(0);
    frame
}

/// Sessions dealt over several session threads (the default is half the cores, so on a
/// small machine one: the rest of the suite runs on one loop) each keep their own upstream
/// connection and settings, answered in turn while the others run, and a cancel reaches a
/// session on any of them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sessions_on_several_session_threads_each_keep_their_own() {
    let p = proxy_with(|c| c.worker_threads = Some(3)).await;
    let mut sessions = Vec::new();
    for i in 0..7 {
        let client = p.client("postgres").await;
        client
            .batch_execute(&format!("SET application_name = 'session-{i}'"))
            .await
            .unwrap();
        let pid: i32 = client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .unwrap()
            .get(0);
        sessions.push((i, client, pid));
    }
    let runs = sessions.iter().map(|(i, client, pid)| async move {
        for _ in 0..30 {
            let row = client
                .query_one(
                    "SELECT current_setting('application_name'), pg_backend_pid()",
                    &[],
                )
                .await
                .unwrap();
            assert_eq!(row.get::<_, String>(0), format!("session-{i}"));
            assert_eq!(
                row.get::<_, i32>(1),
                *pid,
                "session {i} kept its connection"
            );
        }
    });
    tokio::time::timeout(
        Duration::from_secs(60),
        futures_util::future::join_all(runs),
    )
    .await
    .expect("every session answered");

    // The last session (dealt to another thread than the first) is cancelled mid-sleep.
    let (_, last, _) = sessions.last().unwrap();
    let cancel = last.cancel_token();
    let sleeping = last.simple_query("SELECT pg_sleep(30)");
    tokio::pin!(sleeping);
    // Sent again until it lands: one sent before the sleep began cancels nothing.
    let slept = tokio::time::timeout(Duration::from_secs(25), async {
        loop {
            tokio::select! {
                slept = &mut sleeping => break slept,
                () = tokio::time::sleep(Duration::from_millis(300)) => {
                    cancel.cancel_query(NoTls).await.unwrap();
                }
            }
        }
    })
    .await
    .expect("the cancel arrived");
    assert_eq!(
        slept.unwrap_err().code(),
        Some(&SqlState::QUERY_CANCELED),
        "the sleep was cancelled"
    );
    p.shutdown().await;
}

#[tokio::test]
async fn malformed_and_oversized_messages_get_08p01_and_a_close() {
    let p = proxy_with(|c| c.max_message_bytes = Some(64 * 1024)).await;

    let mut s = raw_session(p.addr).await;
    s.write_all(&[b'Q', 0, 0, 0, 2]).await.unwrap();
    assert_eq!(
        first_error_code(&read_to_close(&mut s).await).as_deref(),
        Some("08P01")
    );

    let mut s = raw_session(p.addr).await;
    let mut huge = vec![b'Q'];
    huge.extend_from_slice(&(1_000_000u32).to_be_bytes());
    s.write_all(&huge).await.unwrap();
    assert_eq!(
        first_error_code(&read_to_close(&mut s).await).as_deref(),
        Some("08P01")
    );

    // A bad startup packet too.
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(&[0, 0, 0, 2, 0, 0, 0, 0]).await.unwrap();
    assert_eq!(
        first_error_code(&read_to_close(&mut s).await).as_deref(),
        Some("08P01")
    );

    // Unknown message types are relayed, and the server answers them as it would.
    let mut s = raw_session(p.addr).await;
    s.write_all(&[b'!', 0, 0, 0, 4]).await.unwrap();
    assert_eq!(
        first_error_code(&read_to_close(&mut s).await).as_deref(),
        Some("08P01")
    );

    let text = p.metrics().await;
    assert!(metric(&text, "cutover_protocol_violations_total") >= 3.0);
    p.shutdown().await;
}

/// Frames that came whole before a malformed one in the same read reach the server, as they
/// would without the proxy (PostgreSQL executes messages in order and fails at the bad one):
/// the proxy never drops a write it was sent, even one it rewrote.
#[tokio::test]
async fn frames_before_a_malformed_one_are_still_served() {
    let p = proxy().await;
    let db = support::empty_db().await;
    let direct = db.client().await;
    direct
        .batch_execute("CREATE TABLE kept (id int)")
        .await
        .unwrap();
    let mut s = raw_session_on(p.addr, &db.name).await;
    // One write: an autocommit INSERT, then a Query whose length is impossible.
    let mut bytes = query_frame("INSERT INTO kept VALUES (1)");
    bytes.extend_from_slice(&[b'Q', 0, 0, 0, 2]);
    s.write_all(&bytes).await.unwrap();
    assert_eq!(
        first_error_code(&read_to_close(&mut s).await).as_deref(),
        Some("08P01")
    );
    // The server executes it once the bytes are in, whatever became of the connection.
    let mut kept = 0;
    for _ in 0..100 {
        kept = direct
            .query_one("SELECT count(*) FROM kept", &[])
            .await
            .unwrap()
            .get::<_, i64>(0);
        if kept > 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        kept, 1,
        "the INSERT sent before the malformed frame was dropped"
    );
    p.shutdown().await;
}

#[tokio::test]
async fn an_unreachable_upstream_is_08001() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let p = proxy_with(|c| c.upstream = Some(format!("postgres://127.0.0.1:{port}/x"))).await;
    let err = p.config("postgres").connect(NoTls).await.err().unwrap();
    assert_eq!(
        err.code(),
        Some(&SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION)
    );
    let (status, _) = support::http_get(p.admin.unwrap(), "/readyz").await;
    assert_eq!(status, 503);
    p.shutdown().await;
}

#[tokio::test]
async fn an_upstream_that_vanishes_mid_session_is_08006() {
    // A stand-in server: accepts the startup, says ready, then drops the connection when
    // the first query arrives, without a word.
    let fake = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = fake.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut s, _) = fake.accept().await.unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).await;
        s.write_all(&[b'R', 0, 0, 0, 8, 0, 0, 0, 0, b'Z', 0, 0, 0, 5, b'I'])
            .await
            .unwrap();
        let _ = s.read(&mut buf).await;
        drop(s);
    });
    // The stand-in speaks no TLS negotiation: tell the proxy not to try.
    let p =
        proxy_with(|c| c.upstream = Some(format!("postgres://127.0.0.1:{port}/x?sslmode=disable")))
            .await;
    let (client, conn) = p.config("postgres").connect(NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    let err = client.simple_query("SELECT 1").await.unwrap_err();
    let conn_err = conn.await.unwrap().err();
    let code = err
        .code()
        .cloned()
        .or_else(|| conn_err.as_ref().and_then(|e| e.code().cloned()));
    assert_eq!(
        code,
        Some(SqlState::CONNECTION_FAILURE),
        "{err} / {conn_err:?}"
    );
    p.shutdown().await;
}

#[tokio::test]
async fn a_client_that_goes_away_releases_its_transaction() {
    let p = proxy().await;
    let db = support::empty_db().await;
    let direct = db.client().await;
    direct
        .batch_execute("CREATE TABLE l (id int PRIMARY KEY); INSERT INTO l VALUES (1)")
        .await
        .unwrap();
    let (holder, conn) = p.config(&db.name).connect(NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    holder
        .batch_execute("BEGIN; SELECT * FROM l WHERE id = 1 FOR UPDATE")
        .await
        .unwrap();
    drop(holder);
    conn.abort();
    direct
        .batch_execute("SET lock_timeout = '10s'")
        .await
        .unwrap();
    let started = Instant::now();
    direct
        .batch_execute("SELECT * FROM l WHERE id = 1 FOR UPDATE")
        .await
        .expect("the lock is released once the client is gone");
    assert!(started.elapsed() < Duration::from_secs(10));
    p.shutdown().await;
}

#[tokio::test]
async fn the_client_limit_answers_53300() {
    let p = proxy_with(|c| c.max_client_connections = Some(2)).await;
    let a = p.client("postgres").await;
    let b = p.client("postgres").await;
    let err = p.config("postgres").connect(NoTls).await.err().unwrap();
    assert_eq!(err.code(), Some(&SqlState::TOO_MANY_CONNECTIONS));
    drop(a);
    // The slot frees when the session ends.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match p.config("postgres").connect(NoTls).await {
            Ok((c, conn)) => {
                tokio::spawn(conn);
                assert_eq!(
                    simple_rows(&c, "SELECT 1").await[0][0].as_deref(),
                    Some("1")
                );
                break;
            }
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            Err(e) => panic!("slot never freed: {e}"),
        }
    }
    drop(b);
    p.shutdown().await;
}

#[tokio::test]
async fn shutdown_refuses_new_clients_then_closes_sessions_with_57p01() {
    let p = proxy_with(|c| c.shutdown_grace_seconds = Some(1)).await;
    let addr = p.addr;
    let admin = p.admin.unwrap();
    let (client, conn) = p.config("postgres").connect(NoTls).await.unwrap();
    let conn = tokio::spawn(conn);
    let running = p.running.unwrap();
    let token = running.shutdown_token();
    let stopped = tokio::spawn(running.wait());
    token.cancel();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        tokio::net::TcpStream::connect(addr).await.is_err(),
        "no new connections"
    );
    // Within the grace period the session still works.
    assert_eq!(
        simple_rows(&client, "SELECT 1").await[0][0].as_deref(),
        Some("1")
    );
    let _ = admin;
    stopped.await.unwrap();
    let conn_result = conn.await.unwrap();
    let err = conn_result.expect_err("the session was closed with an error");
    assert_eq!(err.code(), Some(&SqlState::ADMIN_SHUTDOWN), "{err}");
}

#[tokio::test]
async fn admin_endpoint_serves_health_readiness_and_metrics() {
    let p = proxy().await;
    let c = p.client("postgres").await;
    c.batch_execute("SELECT 1").await.unwrap();
    c.query("SELECT * FROM pg_class WHERE relname = 'affiliates'", &[])
        .await
        .unwrap();
    let admin = p.admin.unwrap();
    assert_eq!(support::http_get(admin, "/healthz").await.0, 200);
    assert_eq!(support::http_get(admin, "/readyz").await.0, 200);
    let text = p.metrics().await;
    assert!(
        metric(
            &text,
            "cutover_queries_total{query_type=\"passthrough\",served_by=\"legacy\"}"
        ) >= 2.0,
        "{text}"
    );
    assert!(metric(&text, "cutover_client_connections") >= 1.0);
    p.shutdown().await;
}

/// Reads frames until one of type `until` (inclusive); returns (tag, body) pairs.
async fn frames_until(
    s: &mut tokio::net::TcpStream,
    buf: &mut bytes::BytesMut,
    until: u8,
) -> Vec<(u8, bytes::Bytes)> {
    let mut frames = Vec::new();
    loop {
        while let Some((tag, body)) = cutover::wire::take_frame(buf, usize::MAX).unwrap() {
            let done = tag == until;
            frames.push((tag, body));
            if done {
                return frames;
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(10), s.read_buf(buf))
            .await
            .expect("a reply within 10 s")
            .unwrap();
        assert!(n > 0, "closed; frames so far: {frames:?}");
    }
}

fn startup_packet(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let mut packet = ((body.len() + 4) as u32).to_be_bytes().to_vec();
    packet.extend_from_slice(&body);
    packet
}

#[tokio::test]
async fn a_newer_protocol_minor_is_negotiated_by_the_server_as_directly() {
    let p = proxy().await;
    let packet = startup_packet(
        (3 << 16) | 9,
        &[
            ("user", "postgres"),
            ("database", "postgres"),
            ("_pq_.future_option", "x"),
        ],
    );
    let mut replies = Vec::new();
    for port in [cluster().port(), p.addr.port()] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(&packet).await.unwrap();
        let mut buf = bytes::BytesMut::new();
        let frames = frames_until(&mut s, &mut buf, b'Z').await;
        let negotiate = frames.iter().find(|(t, _)| *t == b'v').cloned();
        replies.push(negotiate);
    }
    assert!(replies[0].is_some(), "the server negotiates down");
    assert_eq!(replies[0], replies[1]);
    p.shutdown().await;
}

#[tokio::test]
async fn function_calls_and_parameter_status_changes_are_relayed() {
    let p = proxy().await;
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(&startup_packet(
        196_608,
        &[("user", "postgres"), ("database", "postgres")],
    ))
    .await
    .unwrap();
    let mut buf = bytes::BytesMut::new();
    frames_until(&mut s, &mut buf, b'Z').await;

    // FunctionCall (F): int4pl (oid 177) of 40 and 2, binary arguments and result.
    let mut body = Vec::new();
    body.extend_from_slice(&177u32.to_be_bytes());
    body.extend_from_slice(&1u16.to_be_bytes()); // one format code for all arguments
    body.extend_from_slice(&1u16.to_be_bytes()); // binary
    body.extend_from_slice(&2u16.to_be_bytes()); // two arguments
    for v in [40i32, 2] {
        body.extend_from_slice(&4u32.to_be_bytes());
        body.extend_from_slice(&v.to_be_bytes());
    }
    body.extend_from_slice(&1u16.to_be_bytes()); // binary result
    s.write_all(&cutover::wire::frame(b'F', &body))
        .await
        .unwrap();
    let frames = frames_until(&mut s, &mut buf, b'Z').await;
    let (_, result) = frames
        .iter()
        .find(|(t, _)| *t == b'V')
        .expect("FunctionCallResponse");
    assert_eq!(&result[..], &[0, 0, 0, 4, 0, 0, 0, 42]);

    // SET application_name: the server reports the change (ParameterStatus, S).
    s.write_all(&cutover::wire::frame(
        b'Q',
        b"SET application_name = 'renamed'\0",
    ))
    .await
    .unwrap();
    let frames = frames_until(&mut s, &mut buf, b'Z').await;
    assert!(
        frames
            .iter()
            .any(|(t, b)| *t == b'S' && b.starts_with(b"application_name\0renamed\0")),
        "{frames:?}"
    );

    // Terminate: the proxy closes the session.
    s.write_all(&[b'X', 0, 0, 0, 4]).await.unwrap();
    let rest = read_to_close(&mut s).await;
    assert!(rest.is_empty());
    p.shutdown().await;
}

#[tokio::test]
async fn pipelined_extended_batch_with_an_error_discards_until_sync_like_the_server() {
    // Parse/Bind/Execute ×3 with the middle one failing, then one Sync, sent at once;
    // the bytes back through the proxy equal the bytes back from the server directly.
    let p = proxy().await;
    let mut replies = Vec::new();
    for port in [cluster().port(), p.addr.port()] {
        let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        s.write_all(&startup_packet(
            196_608,
            &[("user", "postgres"), ("database", "postgres")],
        ))
        .await
        .unwrap();
        let mut buf = bytes::BytesMut::new();
        frames_until(&mut s, &mut buf, b'Z').await;
        let mut batch = Vec::new();
        for sql in ["SELECT 1", "SELECT 1/0", "SELECT 3"] {
            batch.extend_from_slice(&cutover::wire::frame(
                b'P',
                format!("\0{sql}\0\0\0").as_bytes(),
            ));
            batch.extend_from_slice(&cutover::wire::frame(b'B', b"\0\0\0\0\0\0\0\0"));
            batch.extend_from_slice(&cutover::wire::frame(b'E', b"\0\0\0\0\0"));
        }
        batch.extend_from_slice(&cutover::wire::frame(b'S', b""));
        s.write_all(&batch).await.unwrap();
        let frames = frames_until(&mut s, &mut buf, b'Z').await;
        // Error fields name a source line that is the same either way; keep the tags and
        // the non-error bodies.
        replies.push(
            frames
                .into_iter()
                .map(|(t, b)| {
                    if t == b'E' {
                        (t, bytes::Bytes::new())
                    } else {
                        (t, b)
                    }
                })
                .collect::<Vec<_>>(),
        );
    }
    let tags: Vec<u8> = replies[0].iter().map(|(t, _)| *t).collect();
    assert_eq!(
        tags, b"12DC1EZ",
        "SELECT 1 answered, 1/0 failed at Bind, SELECT 3 skipped"
    );
    assert_eq!(replies[0], replies[1]);
    p.shutdown().await;
}

#[tokio::test]
async fn gssenc_is_declined_and_startup_parameters_reach_the_server() {
    let p = proxy().await;
    // GSSENCRequest: 'N', then a normal startup on the same connection.
    let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
    s.write_all(&[0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x30])
        .await
        .unwrap();
    let mut answer = [0u8; 1];
    s.read_exact(&mut answer).await.unwrap();
    assert_eq!(&answer, b"N");
    s.write_all(&startup_packet(
        196_608,
        &[
            ("user", "postgres"),
            ("database", "postgres"),
            ("application_name", "through-cutover"),
            (
                "options",
                "-c search_path=custom_path -c statement_timeout=1234",
            ),
        ],
    ))
    .await
    .unwrap();
    let mut buf = bytes::BytesMut::new();
    let frames = frames_until(&mut s, &mut buf, b'Z').await;
    assert!(
        frames
            .iter()
            .any(|(t, b)| *t == b'S' && b.starts_with(b"application_name\0through-cutover\0"))
    );
    // The proxy's own key, not the server's: 4-byte secret in protocol 3.0.
    let (_, key) = frames
        .iter()
        .find(|(t, _)| *t == b'K')
        .expect("BackendKeyData");
    assert_eq!(key.len(), 8);
    s.write_all(&cutover::wire::frame(
        b'Q',
        b"SHOW search_path; SHOW statement_timeout\0",
    ))
    .await
    .unwrap();
    let frames = frames_until(&mut s, &mut buf, b'Z').await;
    let rows: Vec<&[u8]> = frames
        .iter()
        .filter(|(t, _)| *t == b'D')
        .map(|(_, b)| &b[6..])
        .collect();
    assert_eq!(rows, [&b"custom_path"[..], &b"1234ms"[..]]);
    p.shutdown().await;
}

#[tokio::test]
async fn statements_are_counted_by_query_type_in_both_protocols() {
    let p = proxy().await;
    let db = support::migrated_db().await;
    let c = p.client(&db.name).await;
    let series =
        |t: &str| format!("cutover_queries_total{{query_type=\"{t}\",served_by=\"legacy\"}}");
    let before = p.metrics().await;

    // Simple protocol, literals.
    c.simple_query("SELECT * FROM affiliates WHERE affiliate_id = 1")
        .await
        .unwrap();
    // Extended protocol: one Parse, three Bind/Execute.
    let stmt = c
        .prepare("SELECT * FROM affiliates WHERE affiliate_id = $1")
        .await
        .unwrap();
    for id in [1i64, 2, 3] {
        c.query(&stmt, &[&id]).await.unwrap();
    }
    // No rule names it: automatic.
    c.simple_query("SELECT email FROM affiliates WHERE name = 'x'")
        .await
        .unwrap();
    // The parser cannot read it: relayed untouched, and the client gets its answer.
    let rows = c
        .simple_query(
            "SELECT affiliate_id FROM affiliates WHERE affiliate_id = 1 FOR NO KEY UPDATE",
        )
        .await
        .unwrap();
    assert!(matches!(
        rows.last(),
        Some(SimpleQueryMessage::CommandComplete(0))
    ));

    let after = p.metrics().await;
    let delta = |t: &str| metric(&after, &series(t)) - metric(&before, &series(t));
    assert_eq!(delta("affiliate_by_id"), 4.0, "{after}");
    assert_eq!(delta("automatic"), 1.0);
    assert_eq!(delta("unparsable"), 1.0);
    p.shutdown().await;
}

#[tokio::test]
async fn invalid_rules_stop_the_proxy_from_starting() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("bad.toml"),
        "[[query_type]]\nname = \"x\"\nstage = \"nope\"\n",
    )
    .unwrap();
    let config = cutover::config::FileConfig {
        listen: Some("127.0.0.1:0".into()),
        admin: Some("off".into()),
        upstream: Some(format!(
            "postgres://127.0.0.1:{}/postgres",
            cluster().port()
        )),
        rules: Some(dir.path().to_owned()),
        ..Default::default()
    }
    .validate()
    .unwrap();
    let err = cutover::serve::start(config).await.err().expect("refused");
    // As the CLI prints it: the error, then its causes, each once.
    let text = format!("{:#}", anyhow::Error::from(err));
    assert!(
        text.contains("refusing to start: 1 problem(s) in the rules") && text.contains("bad.toml:"),
        "{text}"
    );
    assert_eq!(text.matches("problem(s) in the rules").count(), 1, "{text}");
}

#[tokio::test]
async fn sslmode_require_against_a_server_without_tls_is_08001() {
    let p = proxy_with(|c| {
        c.upstream = Some(format!(
            "postgres://127.0.0.1:{}/postgres?sslmode=require",
            cluster().port()
        ))
    })
    .await;
    let err = p.config("postgres").connect(NoTls).await.err().unwrap();
    assert_eq!(
        err.code(),
        Some(&SqlState::SQLCLIENT_UNABLE_TO_ESTABLISH_SQLCONNECTION)
    );
    let message = err
        .as_db_error()
        .map(|e| e.message().to_owned())
        .unwrap_or_default();
    assert!(message.contains("does not accept TLS"), "{message}");
    p.shutdown().await;
}
