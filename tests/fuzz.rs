//! Fuzzing on the stable toolchain (proptest over arbitrary and half-structured input): the
//! code that reads what clients and servers send must never panic, whatever the bytes.
//!
//! - the frame decoder and every message parser, on arbitrary bytes and on frames of every
//!   type with arbitrary bodies;
//! - the startup packet (initial negotiation);
//! - the proxy's side of SCRAM, with arbitrary client messages;
//! - the auth file, the upstream URL's TLS options;
//! - classify + rewrite (and what samples store of a statement) over arbitrary SQL text and
//!   over mutations of the rules' own statements;
//! - and the live proxy: sessions that send malformed frames get 08P01 or the server's own
//!   answer, never a crash, and the proxy serves the next client.
//!
//! `CUTOVER_FUZZ_CASES` sets the cases per target (default 2000; `.ci/run` runs more).
//! Failures print proptest's shortest input.

mod support;

use std::{path::Path, sync::Arc, sync::OnceLock};

use bytes::BytesMut;
use cutover::{
    proxy::auth::{AuthFile, ScramSecret, Secret, scram::ServerExchange},
    routing::rules::RuleSet,
    routing::{classify::Classifier, fingerprint},
    wire::{self, messages},
};
use proptest::{prelude::*, strategy::ValueTree};

fn cases() -> u32 {
    std::env::var("CUTOVER_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(2000)
}

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        // Failures are printed; nothing is written into the source tree.
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

/// Every message type either side sends, and a few that none does.
const TAGS: &[u8] = b"QPBEDCHSFXdcfpRKENZ1T2nD3CIstAGWVvo!\0";

/// A frame: a known tag, a body, and a length that is right most of the time.
fn frame() -> impl Strategy<Value = Vec<u8>> {
    (
        prop::sample::select(TAGS),
        prop::collection::vec(any::<u8>(), 0..300),
        prop::option::weighted(0.8, Just(())),
        any::<u32>(),
    )
        .prop_map(|(tag, body, right, wrong)| {
            let len = if right.is_some() {
                body.len() as u32 + 4
            } else {
                wrong
            };
            let mut out = vec![tag];
            out.extend_from_slice(&len.to_be_bytes());
            out.extend_from_slice(&body);
            out
        })
}

/// Runs every message parser over a body, as the relay and the login would.
fn parse_everything(tag: u8, body: &[u8]) {
    let _ = messages::parse_error(body).is_fatal();
    let _ = messages::error_field_list(body).count();
    let _ = messages::auth_code(body);
    let _ = messages::sasl_without_channel_binding(body);
    let _ = messages::parse_backend_key(body);
    let _ = messages::ready_status(body);
    let _ = messages::first_value(body);
    let _ = messages::query_text(body);
    let _ = messages::parse_text(body);
    let _ = messages::ParseMessage::read(body).map(|p| (p.param_types(), p.param_types_are(&[20])));
    let _ = messages::bind_params(body);
    let _ = messages::bind_param(body, 1);
    let _ = messages::bind_names(body);
    let _ = messages::execute_portal(body);
    let _ = messages::close_target(body);
    let _ = messages::dual_write_report(body);
    let _ = messages::tagged_query(body, "t");
    let _ = messages::tagged_parse(body, "t");
    let _ = messages::describe_as(&mut body.to_vec(), &[(23, 4, -1), (25, -1, -1)]);
    let _ = wire::frame(tag, body);
}

fn decode_all(bytes: &[u8]) {
    let mut buf = BytesMut::from(bytes);
    while let Ok(Some((tag, body))) = wire::take_frame(&mut buf, 1 << 20) {
        parse_everything(tag, &body);
    }
    let _ = wire::header(bytes, 1 << 20);
}

fn rules() -> &'static Arc<RuleSet> {
    static RULES: OnceLock<Arc<RuleSet>> = OnceLock::new();
    RULES.get_or_init(|| {
        Arc::new(
            RuleSet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("rules"))
                .expect("the repository's rules"),
        )
    })
}

fn classifier() -> &'static Classifier {
    static CLASSIFIER: OnceLock<Classifier> = OnceLock::new();
    CLASSIFIER.get_or_init(|| Classifier::new(Arc::clone(rules())))
}

/// The rules' own statements (their `match` and `target` SQL), the seeds of the mutations.
fn statements() -> Vec<String> {
    let mut out: Vec<String> = rules()
        .query_types
        .iter()
        .flat_map(|q| [q.example_sql.clone(), q.target_sql.clone()])
        .flatten()
        .collect();
    out.extend(
        [
            "SELECT * FROM affiliates WHERE affiliate_id = 1 FOR NO KEY UPDATE",
            "COPY affiliates TO STDOUT",
            "DO $$ BEGIN PERFORM 1 FROM affiliates; END $$",
            "PREPARE p(bigint) AS SELECT * FROM public.affiliates WHERE affiliate_id = $1; EXECUTE p(1)",
            "SELECT 'public.affiliates'::regclass, affiliates.* FROM \"affiliates\"",
            "WITH x AS (DELETE FROM affiliates WHERE affiliate_id = 3 RETURNING *) SELECT count(*) FROM x",
        ]
        .map(str::to_owned),
    );
    out
}

const PIECES: &[&str] = &[
    " ",
    "(",
    ")",
    ",",
    ";",
    "'",
    "\"",
    "$1",
    "$99",
    "--",
    "/*",
    "*/",
    "$$",
    "::",
    "affiliates",
    "public.",
    "fature_v2.",
    "SELECT",
    "FROM",
    "WHERE",
    "JOIN",
    "UNION ALL",
    "WITH RECURSIVE",
    "ORDER BY",
    "LIMIT",
    "FOR UPDATE",
    "RETURNING",
    "INSERT INTO",
    "VALUES",
    "UPDATE",
    "SET",
    "DELETE",
    "ON CONFLICT",
    "NULL",
    "1e309",
    "-9223372036854775809",
    "E'\\x'",
    "ß",
    "\u{0}",
    "\u{FEFF}",
    "🙂",
];

/// A rule statement, cut, spliced and sprinkled with SQL pieces.
fn mutated_sql() -> impl Strategy<Value = String> {
    let seeds = statements();
    (
        prop::sample::select(seeds),
        prop::collection::vec(
            (
                any::<prop::sample::Index>(),
                0usize..4,
                prop::sample::select(PIECES),
            ),
            0..6,
        ),
    )
        .prop_map(|(seed, edits)| {
            let mut sql: Vec<char> = seed.chars().collect();
            for (at, op, piece) in edits {
                let i = at.index(sql.len() + 1);
                match op {
                    0 => sql.truncate(i),
                    1 => {
                        let end = (i + 7).min(sql.len());
                        sql.drain(i..end);
                    }
                    _ => {
                        for (n, c) in piece.chars().enumerate() {
                            sql.insert(i + n, c);
                        }
                    }
                }
            }
            sql.into_iter().collect()
        })
}

fn classify_and_rewrite(sql: &str) {
    let _ = classifier().classify(sql);
    let _ = classifier().mentions_table(sql.as_bytes());
    let _ = cutover::routing::rewrite::Rewriter::new(&rules().table).rewrite(sql);
    let _ = fingerprint::fingerprint(sql);
    let _ = fingerprint::literals_hidden(sql);
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn the_frame_decoder_takes_any_bytes(bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        decode_all(&bytes);
    }

    #[test]
    fn every_parser_takes_any_frame(frames in prop::collection::vec(frame(), 1..20)) {
        decode_all(&frames.concat());
        for f in &frames {
            if f.len() >= 5 {
                parse_everything(f[0], &f[5..]);
            }
        }
    }

    #[test]
    fn the_startup_packet_takes_any_bytes(
        version in prop::sample::select(vec![196_608u32, 196_610, 80_877_103, 80_877_104, 80_877_102, 0, u32::MAX]),
        body in prop::collection::vec(any::<u8>(), 0..400),
        length in prop::option::weighted(0.7, any::<u32>()),
    ) {
        let mut packet = (length.unwrap_or(body.len() as u32 + 8)).to_be_bytes().to_vec();
        packet.extend_from_slice(&version.to_be_bytes());
        packet.extend_from_slice(&body);
        let mut buf = BytesMut::from(&packet[..]);
        while let Ok(Some(initial)) = wire::take_initial(&mut buf) {
            if let wire::Initial::Startup(startup) = initial {
                let _ = startup.user_and_database();
                let _ = startup.param("application_name");
            }
        }
    }

    #[test]
    fn the_proxys_scram_takes_any_client_messages(
        mechanism in prop::sample::select(vec!["SCRAM-SHA-256", "SCRAM-SHA-256-PLUS", "", "x"]),
        first in prop::collection::vec(any::<u8>(), 0..200),
        last in prop::collection::vec(any::<u8>(), 0..200),
        structured in prop::option::of("[nyp][=a-z-]{0,24},,n=,r=[ -~]{0,30}"),
        bound in any::<bool>(),
    ) {
        static SECRET: OnceLock<ScramSecret> = OnceLock::new();
        let secret = SECRET.get_or_init(|| ScramSecret::for_password("pw")).clone();
        let binding = bound.then_some(&[7u8; 32][..]);
        let first = structured.map(String::into_bytes).unwrap_or(first);
        if let Ok((exchange, _)) = ServerExchange::start(secret, mechanism, &first, binding) {
            let _ = exchange.finish(&last);
        }
    }

    #[test]
    fn auth_files_and_upstream_urls_take_any_text(text in "\\PC{0,300}", line in "[\"a-z ;#]{0,40}") {
        let _ = AuthFile::parse(&text);
        let _ = AuthFile::parse(&line);
        let _ = Secret::parse(&text);
        let _ = ScramSecret::parse(&format!("SCRAM-SHA-256${text}"));
        let _ = cutover::net::connect::take_verify(&text);
        let _ = cutover::net::connect::parse_url(&text);
        let _ = cutover::net::connect::take_verify(&format!("postgres://h/d?{line}&sslmode=verify-ca&sslrootcert={text}"));
    }

    #[test]
    fn classify_and_rewrite_take_any_text(sql in "\\PC{0,200}") {
        classify_and_rewrite(&sql);
    }

    #[test]
    fn classify_and_rewrite_take_broken_statements(sql in mutated_sql()) {
        classify_and_rewrite(&sql);
    }
}

/// The live proxy under malformed input: sessions that send frames of every type with
/// arbitrary bodies (and wrong lengths) after a real login. Each gets an answer or a close,
/// never a hang or a crash; the proxy still serves a client afterwards.
#[test]
fn the_live_proxy_survives_malformed_sessions() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let sessions = (cases() / 10).max(50) as usize;
    let mut runner = proptest::test_runner::TestRunner::new(config());
    let frames = prop::collection::vec(frame(), 1..100);
    let inputs: Vec<Vec<u8>> = (0..sessions)
        .map(|_| frames.new_tree(&mut runner).unwrap().current().concat())
        .collect();
    runtime.block_on(async {
        let p = support::proxy_with(|c| c.max_message_bytes = Some(1 << 16)).await;
        let mut sent = 0usize;
        for input in &inputs {
            let mut s = tokio::net::TcpStream::connect(p.addr).await.unwrap();
            s.write_all(&support::startup_packet("postgres", "postgres"))
                .await
                .unwrap();
            let _ = s.write_all(input).await;
            sent += input.len();
            // An answer, or the close: within a bound either way (the server may wait for
            // the rest of a long frame: then the proxy is waiting too, which is right).
            let mut out = Vec::new();
            let _ = tokio::time::timeout(
                std::time::Duration::from_millis(300),
                s.read_to_end(&mut out),
            )
            .await;
        }
        assert!(sent > 0);
        let client = p.client("postgres").await;
        let one: i32 = client.query_one("SELECT 1", &[]).await.unwrap().get(0);
        assert_eq!(
            one,
            1,
            "the proxy serves on after {} malformed sessions",
            inputs.len()
        );
        p.shutdown().await;
    });
}
