//! The `cutover` command line: parses arguments and calls the library.

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};
use cutover::{config::FileConfig, connect, listener, migrate, rules};

#[derive(Parser)]
#[command(
    name = "cutover",
    version,
    about = "Carry a live application through a PostgreSQL schema migration"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Create the legacy table (as the Fature app has it) and load a generated affiliate tree
    /// into a database, for trials (compose, a scratch database). Refuses a table that
    /// already holds rows.
    Fixture {
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Affiliates to generate
        #[arg(long, default_value_t = 50_000)]
        affiliates: u64,
        /// Add the anomalies real data has: a few orphans and drifted level_1_referrals
        #[arg(long)]
        anomalies: bool,
        /// A table that already holds rows is left as it is (exit 0) instead of refused
        #[arg(long)]
        if_empty: bool,
        /// Ids independent of the tree's shape (about half of the children get a smaller id
        /// than their parent), as ids imported from another system are
        #[arg(long)]
        shuffle_ids: bool,
    },
    /// The divergence report for reviewers: per query type the outcomes, match rate, latency
    /// of both sides, trend, readiness verdict against the gate and real examples; overall
    /// the success rate, performance improvement, write divergences, backfill, last verify
    /// and the audit. Reads the shared state, so it covers every replica.
    Report {
        /// The control database (the cutover schema)
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// The window: how far back (e.g. 30m, 24h, 7d)
        #[arg(long, default_value = "24h", value_parser = parse_window)]
        since: std::time::Duration,
        /// html (one self-contained file), md or json
        #[arg(long, default_value = "html")]
        format: cutover::report::render::Format,
        /// en or pt-BR
        #[arg(long, default_value = "en")]
        lang: cutover::report::Lang,
        /// Where to write it (default: standard output)
        #[arg(long)]
        out: Option<PathBuf>,
        /// Directory of the rule files (for the expected classes they declare)
        #[arg(long, default_value = "rules")]
        rules: PathBuf,
    },
    /// The whole migration end to end on a private PostgreSQL it starts itself: a generated
    /// Fature tree, migrate, the proxy with the app's traffic, dual-write, backfill, verify,
    /// shadow comparison, and the stages walked through the real gates to target. The
    /// cluster is removed when it ends.
    Demo {
        /// Affiliates in the generated tree
        #[arg(long, default_value_t = 50_000)]
        affiliates: u64,
        /// Concurrent application clients
        #[arg(long, default_value_t = 8)]
        clients: u64,
        /// After the walk, keep the proxy up this many seconds, then exit (default: until
        /// Ctrl-C)
        #[arg(long, value_name = "SECONDS")]
        exit_after: Option<u64>,
        /// Directory the report (HTML and Markdown) is written to
        #[arg(long, default_value = "cutover-demo")]
        out: PathBuf,
    },
    /// Copy every legacy row into the target, parents first, set-based and resumable; rows
    /// that cannot go (orphans, cycles and their subtrees) are quarantined with their reason.
    /// Exit 0: done, no anomalies; 1: done, with quarantined rows or drifted legacy counters.
    Backfill {
        /// PostgreSQL holding both schemas
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Directory of the rule files (the table and column map)
        #[arg(long, default_value = "rules")]
        rules: PathBuf,
        /// Rows per batch (each batch commits with its checkpoint)
        #[arg(long, default_value_t = cutover::migrate::backfill::DEFAULT_BATCH)]
        batch: i64,
        /// Report what would be copied and quarantined; change nothing
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of a summary
        #[arg(long)]
        json: bool,
    },
    /// Bring every drifted target row back to the legacy truth: insert missing keys (parents
    /// first), delete extra ones, give different ones legacy's values, recompute counters —
    /// in one transaction. Exit 1 if some keys could not be repaired.
    Repair {
        /// PostgreSQL holding both schemas
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Directory of the rule files (the table and column map)
        #[arg(long, default_value = "rules")]
        rules: PathBuf,
        /// Report what would change; change nothing
        #[arg(long)]
        dry_run: bool,
        /// Print JSON instead of a summary
        #[arg(long)]
        json: bool,
    },
    /// Compare legacy and target row by row in one snapshot (every mapped column, chunked by
    /// key range), run the seed's integrity and post-migration checks and its performance
    /// criteria; exit 1 on any drift or failed check.
    Verify {
        /// PostgreSQL holding both schemas
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Directory of the rule files (the table and column map)
        #[arg(long, default_value = "rules")]
        rules: PathBuf,
        /// Keys compared per query
        #[arg(long, default_value_t = cutover::migrate::verify::DEFAULT_CHUNK)]
        chunk: i64,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Validate and explain the rule files.
    #[command(subcommand)]
    Rules(RulesCommand),
    /// Run the proxy: applications connect to --listen as they would to PostgreSQL; each
    /// session gets its own upstream connection, authenticated with the client's own
    /// credentials. SIGTERM stops accepting, lets sessions finish for the grace period,
    /// then closes them with 57P01.
    Serve(Box<ServeArgs>),
    /// Apply the migrations (fature_v2 schema, cutover state) in order, each in a
    /// transaction, recorded in cutover.schema_migrations with a checksum.
    ///
    /// A second run does nothing. An applied migration whose file changed is refused, as
    /// is a database that records a migration this binary does not know. Concurrent runs
    /// wait for each other.
    Migrate {
        /// PostgreSQL URL: postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
        /// Read migrations from this directory instead of those built into the binary.
        #[arg(long, value_name = "DIR")]
        migrations_dir: Option<PathBuf>,
        /// List what would be applied, change nothing.
        #[arg(long)]
        dry_run: bool,
        /// The rules whose query types get their baseline stage in cutover.query_type_state
        /// (so that the runbook's SQL fallback finds their rows before a proxy ran); skipped
        /// when the directory does not exist
        #[arg(long, default_value = "rules")]
        rules: PathBuf,
    },
    /// Operate a running proxy through its admin API: the stage of every query type, a
    /// stage change (with a reason; refused by the safety gate without enough evidence,
    /// unless forced), and the audit of changes. Every replica applies a change within a
    /// second.
    Ctl {
        /// The proxy's admin address (its --admin)
        #[arg(long, default_value = cutover::config::DEFAULT_ADMIN, value_name = "IP:PORT")]
        admin: String,
        /// Bearer token (one the proxy is configured with): an admin token, or a read token
        /// for status, history and changes [default: CUTOVER_ADMIN_TOKEN, else CUTOVER_READ_TOKEN]
        #[arg(long, env = "CUTOVER_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Mark a class of divergence as expected (reviewers): confirmed divergences of this
    /// query type and kind whose differing columns are all among --columns are counted
    /// `expected`, apart, and no longer hold the safety gate back.
    Mark {
        /// The query type
        query_type: String,
        /// drift, rewrite_bug, error or undetermined
        #[arg(long)]
        kind: String,
        /// The output columns that differ (comma-separated)
        #[arg(long, value_delimiter = ',', required = true)]
        columns: Vec<String>,
        /// A short name for the class (e.g. counter_drift)
        #[arg(long)]
        class: String,
        /// Why it is expected (recorded)
        #[arg(long)]
        note: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// The behaviour changes the rules declare (where v2 answers differently on purpose):
    /// how often each happened, and whether a reviewer accepted it.
    Changes {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Accept a declared behaviour change (reviewers): until then the gate lets none of the
    /// query types it shows through serve from v2. Exit 1 if refused.
    Accept {
        /// Its name in the rules (`cutover ctl changes` lists them)
        name: String,
        /// Why it is acceptable (recorded)
        #[arg(long)]
        reason: String,
        /// Print JSON
        #[arg(long)]
        json: bool,
    },
    /// Every query type: its stage, dual-write mode, and whether the state is live.
    Status {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Move a query type to a stage: legacy, shadow, cutover PERCENT, target, complete.
    /// Exit 1 if refused (the safety gate, an unknown query type or stage).
    Set {
        /// A query type's name (`cutover ctl status` lists them)
        query_type: String,
        /// legacy, shadow, cutover, target or complete
        stage: String,
        /// With stage cutover: the share of buckets served by the target (0-100)
        percent: Option<u8>,
        /// Why (recorded in the audit)
        #[arg(long)]
        reason: String,
        /// Go past the safety gate (recorded as forced)
        #[arg(long)]
        force: bool,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// The latest stage changes, newest first: when, what, from → to, who, why.
    History {
        /// How many
        #[arg(long, default_value_t = 20)]
        limit: u32,
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RulesCommand {
    /// Validate the rule files; print every problem as FILE:LINE:COLUMN: MESSAGE and exit 1
    /// if there is any. With --database-url, also check them against the database: tables
    /// and columns exist, and every target SQL prepares with the parameters and the result
    /// columns (names and types) of its legacy statement.
    Check {
        /// Directory of the rule files
        #[arg(default_value = "rules")]
        dir: PathBuf,
        /// PostgreSQL holding both schemas (optional)
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: Option<String>,
    },
    /// Write an automatic query type (fp_…, a statement no rule names) into the rules as a
    /// named one: its statement becomes the rule's `match`; the new rule set is validated
    /// whole before the file is written; its live stage carries over, audited.
    Promote {
        /// The automatic query type's id (as `cutover report` and the metrics show it)
        fingerprint: String,
        /// The name of the new query type
        #[arg(long)]
        name: String,
        /// Directory of the rule files
        #[arg(long, default_value = "rules")]
        rules: PathBuf,
        /// The file of that directory to append the rule to
        #[arg(long, default_value = "promoted.toml")]
        file: String,
        /// The control database (where the shadow records automatic types)
        #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
        database_url: String,
    },
    /// Show what the proxy will do with a statement: its query type (named by a rule, or
    /// automatic from its fingerprint), fingerprint, stage, bucket, and the SQL it becomes on
    /// the target — or why it is not routable and stays on legacy.
    Explain {
        /// The statement (as the application sends it: literals or $n parameters)
        sql: String,
        /// Directory of the rule files
        #[arg(long, default_value = "rules")]
        rules: PathBuf,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args)]
struct ServeArgs {
    /// TOML configuration file; the flags below override its values.
    #[arg(long, short = 'c', value_name = "FILE")]
    config: Option<PathBuf>,
    /// Address for applications [default: 127.0.0.1:6432]
    #[arg(long, value_name = "IP:PORT")]
    listen: Option<String>,
    /// PostgreSQL with the legacy table and fature_v2: postgres://[USER[:PASSWORD]@]HOST[:PORT]/DB.
    /// Its user and password are only for the proxy's own connections.
    #[arg(
        long,
        env = "CUTOVER_UPSTREAM",
        hide_env_values = true,
        value_name = "URL"
    )]
    upstream: Option<String>,
    /// Address of /metrics, /healthz and /readyz, or "off" [default: 127.0.0.1:9187]
    #[arg(long, value_name = "IP:PORT")]
    admin: Option<String>,
    /// Client connections served at once; the next gets FATAL 53300 [default: 1000]
    #[arg(long, value_name = "N")]
    max_client_connections: Option<usize>,
    /// Largest message accepted from a client, in bytes [default: 1 GiB]
    #[arg(long, value_name = "BYTES")]
    max_message_bytes: Option<usize>,
    /// Seconds sessions may go on after SIGTERM before they are closed [default: 30]
    #[arg(long, value_name = "SECONDS")]
    shutdown_grace: Option<u64>,
    /// Directory of the rule files; invalid rules stop the proxy from starting [default: rules]
    #[arg(long, value_name = "DIR")]
    rules: Option<PathBuf>,
    /// Threads that run client sessions [default: one per CPU core]
    #[arg(long, value_name = "N")]
    worker_threads: Option<usize>,
    /// PEM certificate for TLS to clients (with --tls-key)
    #[arg(long, value_name = "FILE")]
    tls_cert: Option<PathBuf>,
    /// PEM private key for TLS to clients (with --tls-cert)
    #[arg(long, value_name = "FILE")]
    tls_key: Option<PathBuf>,
    /// Refuse clients that do not use TLS (with --tls-cert/--tls-key)
    #[arg(long)]
    client_tls_required: bool,
    /// Database of the cutover schema (live state, audit), with the proxy's own role
    /// [default: the upstream URL, when it names a user]
    #[arg(
        long,
        env = "CUTOVER_CONTROL",
        hide_env_values = true,
        value_name = "URL"
    )]
    control: Option<String>,
    /// Bearer token allowed to change stages through the admin API (named "default")
    #[arg(
        long,
        env = "CUTOVER_ADMIN_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    admin_token: Option<String>,
    /// Bearer token that may read the admin API and /status but change nothing (named "reader")
    #[arg(
        long,
        env = "CUTOVER_READ_TOKEN",
        hide_env_values = true,
        value_name = "TOKEN"
    )]
    read_token: Option<String>,
    /// Database the shadow re-runs reads on, with its own role [default: the control database]
    #[arg(
        long,
        env = "CUTOVER_SHADOW",
        hide_env_values = true,
        value_name = "URL"
    )]
    shadow: Option<String>,
    /// Connections of the shadow pool; 0 turns the shadow off [default: 4]
    #[arg(long, value_name = "N")]
    shadow_connections: Option<usize>,
    /// Comparisons waiting for the shadow pool before new ones are dropped [default: 1024]
    #[arg(long, value_name = "N")]
    shadow_queue: Option<usize>,
    /// statement_timeout of the shadow's statements, in milliseconds [default: 5000]
    #[arg(long, value_name = "MS")]
    shadow_timeout_ms: Option<u64>,
    /// Seconds a client may take to log in, as PostgreSQL's authentication_timeout [default: 60]
    #[arg(long, value_name = "SECONDS")]
    authentication_timeout: Option<u64>,
    /// Logins under way at once, apart from sessions [default: --max-client-connections]
    #[arg(long, value_name = "N")]
    max_logins_in_progress: Option<usize>,
    /// Users' password secrets, pgbouncer's auth_file format ("user" "secret" per line):
    /// cutover authenticates those users itself (SCRAM with TLS on both legs needs it)
    #[arg(long, value_name = "FILE")]
    auth_file: Option<PathBuf>,
    /// Database and role allowed to read users' password secrets with --auth-query
    #[arg(
        long,
        env = "CUTOVER_AUTH_URL",
        hide_env_values = true,
        value_name = "URL"
    )]
    auth_url: Option<String>,
    /// Query returning a user's secret ($1: user name; last column: the secret)
    /// [default: pgbouncer's, on pg_authid]
    #[arg(long, value_name = "SQL")]
    auth_query: Option<String>,
}

/// A window like `30m`, `24h`, `7d`, `90s`.
fn parse_window(s: &str) -> Result<std::time::Duration, String> {
    let (n, unit) = s.split_at(s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len()));
    let n: u64 = n
        .parse()
        .map_err(|_| format!("{s:?}: a number and a unit (30m, 24h, 7d)"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "" => {
            return Err(format!(
                "{s:?}: give a unit: {s}m, {s}h or {s}d (s, m, h, d)"
            ));
        }
        "d" => n * 86_400,
        _ => return Err(format!("{s:?}: the unit is s, m, h or d")),
    };
    if secs == 0 {
        return Err("the window must not be empty".into());
    }
    Ok(std::time::Duration::from_secs(secs))
}

/// What to do about a database error a command stopped on, when the cause is a step not
/// taken yet (the schemas not migrated) or the wrong database.
fn what_to_do(error: &anyhow::Error) -> Option<&'static str> {
    use tokio_postgres::error::SqlState;
    // The server's words, wherever a layer kept them (some wrap the error as text).
    let text = format!("{error:#}");
    let coded = error
        .chain()
        .find_map(|e| e.downcast_ref::<tokio_postgres::Error>())
        .and_then(|e| e.as_db_error())
        .is_some_and(|db| {
            [
                SqlState::UNDEFINED_TABLE,
                SqlState::INVALID_SCHEMA_NAME,
                SqlState::UNDEFINED_FUNCTION,
            ]
            .contains(db.code())
        });
    let missing = coded || text.contains("does not exist");
    if !missing {
        return None;
    }
    let ours = [
        "relation \"fature_v2.",
        "relation \"cutover.",
        "schema \"fature_v2\"",
        "schema \"cutover\"",
        "function cutover.",
        "function fature_v2.",
    ];
    if ours.iter().any(|m| text.contains(m)) {
        Some(
            "the database is not migrated yet: run `cutover migrate --database-url …` first (it creates fature_v2 and the cutover schema)",
        )
    } else if text.contains("relation \"affiliates\"")
        || text.contains("relation \"public.affiliates\"")
    {
        Some(
            "this database has no legacy table public.affiliates: check the URL's database (cutover migrates the application's own database)",
        )
    } else {
        None
    }
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CUTOVER_LOG")
                .unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        // Colours for people at a terminal only, never in a log file or a journal.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();

    let cli = Cli::parse();
    // Accepting, the admin endpoint and the other commands; sessions run on their own
    // threads (see the listener).
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(run(cli.command));
    // Tasks still blocked (an HTTP call of an interrupted demo, say) do not hold the exit.
    runtime.shutdown_timeout(std::time::Duration::from_secs(3));
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            if let Some(hint) = what_to_do(&e) {
                eprintln!("hint: {hint}");
            }
            ExitCode::from(2)
        }
    }
}

async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Serve(args) => serve(*args).await,
        Command::Fixture {
            database_url,
            affiliates,
            anomalies,
            if_empty,
            shuffle_ids,
        } => {
            let client = connect::connect(&connect::parse_url(&database_url)?).await?;
            let exists: bool = client
                .query_one("SELECT to_regclass('public.affiliates') IS NOT NULL", &[])
                .await?
                .get(0);
            if exists {
                let rows: i64 = client
                    .query_one("SELECT count(*) FROM public.affiliates", &[])
                    .await?
                    .get(0);
                if rows > 0 && if_empty {
                    println!("public.affiliates already holds {rows} rows: left as it is");
                    return Ok(ExitCode::SUCCESS);
                }
                if rows > 0 {
                    anyhow::bail!(
                        "public.affiliates already holds {rows} rows: the fixture only fills an empty table"
                    );
                }
            } else {
                cutover::fixture::create_legacy_table(&client).await?;
            }
            let spec = cutover::fixture::TreeSpec {
                orphans: if anomalies { 3 } else { 0 },
                drifted_counters: if anomalies {
                    (affiliates / 500).max(5)
                } else {
                    0
                },
                shuffle_ids,
                ..cutover::fixture::TreeSpec::clean(affiliates)
            };
            let generated = cutover::fixture::load(&client, &spec).await?;
            println!(
                "public.affiliates: {} affiliates loaded ({} orphans, {} drifted counters)",
                generated.rows,
                generated.orphans.len(),
                generated.drifted.len()
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Report {
            database_url,
            since,
            format,
            lang,
            out,
            rules: dir,
        } => {
            // The rules only add the expected classes they declare: the report goes on without.
            let rules = rules::RuleSet::load_dir(&dir).ok();
            let client = connect::connect(&connect::parse_url(&database_url)?).await?;
            let report = cutover::report::gather(&client, since, rules.as_ref()).await?;
            let text = cutover::report::render::render(&report, format, lang);
            match out {
                Some(path) => {
                    std::fs::write(&path, text)
                        .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
                    eprintln!("report written to {}", path.display());
                }
                None => print!("{text}"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Demo {
            affiliates,
            clients,
            exit_after,
            out,
        } => {
            cutover::demo::run(cutover::demo::Options {
                affiliates,
                clients: clients.max(1),
                exit_after: exit_after.map(std::time::Duration::from_secs),
                out,
            })
            .await?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Ctl {
            admin,
            token,
            command,
        } => tokio::task::spawn_blocking(move || ctl(&admin, token.as_deref(), command)).await?,
        Command::Repair {
            database_url,
            rules: dir,
            dry_run,
            json,
        } => {
            let set = rules::RuleSet::load_dir(&dir)?;
            let client = connect::connect(&connect::parse_url(&database_url)?).await?;
            let show = migrate::progress::Show::for_stderr(json);
            let summary = migrate::repair::run(&client, &set.table, dry_run, show).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!("{summary}");
            }
            Ok(if summary.unrepairable.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Backfill {
            database_url,
            rules: dir,
            batch,
            dry_run,
            json,
        } => {
            let set = rules::RuleSet::load_dir(&dir)?;
            let config = connect::parse_url(&database_url)?;
            let client = connect::connect(&config).await?;
            let options = migrate::backfill::Options {
                batch: batch.max(1),
                dry_run,
                progress: migrate::progress::Show::for_stderr(json),
                abort_after_batches: std::env::var("CUTOVER_TEST_ABORT_AFTER_BATCHES")
                    .ok()
                    .and_then(|v| v.parse().ok()),
            };
            let summary = migrate::backfill::run(&client, &config, &set.table, &options).await?;
            if json {
                println!("{}", serde_json::to_string_pretty(&summary)?);
            } else {
                println!("{summary}");
            }
            Ok(if summary.anomalies() {
                ExitCode::from(1)
            } else {
                ExitCode::SUCCESS
            })
        }
        Command::Verify {
            database_url,
            rules: dir,
            chunk,
            json,
        } => {
            let set = rules::RuleSet::load_dir(&dir)?;
            let client = connect::connect(&connect::parse_url(&database_url)?).await?;
            let show = migrate::progress::Show::for_stderr(json);
            let report = migrate::verify::verify_showing(&client, &set.table, chunk, show).await?;
            if let Err(error) = migrate::verify::record(&client, &report).await {
                eprintln!("warning: the run was not recorded in cutover.verify_runs: {error}");
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                println!("{report}");
            }
            Ok(if report.ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            })
        }
        Command::Rules(RulesCommand::Check { dir, database_url }) => {
            rules_check(&dir, database_url).await
        }
        Command::Rules(RulesCommand::Explain { sql, rules, json }) => {
            rules_explain(&sql, &rules, json)
        }
        Command::Rules(RulesCommand::Promote {
            fingerprint,
            name,
            rules,
            file,
            database_url,
        }) => {
            let client = connect::connect(&connect::parse_url(&database_url)?).await?;
            let done =
                cutover::rules::promote::promote(&client, &rules, &file, &fingerprint, &name)
                    .await?;
            println!("{}: added{}", done.file.display(), done.rule);
            match done.stage {
                Some(stage) => println!(
                    "live stage {stage} carried over to {name}; reload the proxies' rules (SIGHUP) to use the name"
                ),
                None => println!("reload the proxies' rules (SIGHUP) to use the name"),
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate {
            database_url,
            migrations_dir,
            dry_run,
            rules: rules_dir,
        } => {
            let config = connect::parse_url(&database_url)?;
            let set = match migrations_dir {
                Some(dir) => migrate::MigrationSet::from_dir(&dir)?,
                None => migrate::MigrationSet::embedded(),
            };
            let report = migrate::run(&config, &set, dry_run).await?;
            println!("{report}");
            if !dry_run && rules_dir.is_dir() {
                let rules = rules::RuleSet::load_dir(&rules_dir)?;
                let client = connect::connect(&config).await?;
                let new = cutover::control::seed_query_types(&client, &rules).await?;
                if new > 0 {
                    println!(
                        "{new} query types given their rules' stage in cutover.query_type_state"
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn serve(args: ServeArgs) -> anyhow::Result<ExitCode> {
    let file = match &args.config {
        Some(path) => FileConfig::from_toml(path)?,
        None => FileConfig::default(),
    };
    let flags = FileConfig {
        listen: args.listen,
        upstream: args.upstream,
        admin: args.admin,
        max_client_connections: args.max_client_connections,
        max_message_bytes: args.max_message_bytes,
        shutdown_grace_seconds: args.shutdown_grace,
        worker_threads: args.worker_threads,
        rules: args.rules,
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        client_tls_required: args.client_tls_required.then_some(true),
        control: args.control,
        admin_tokens: args
            .admin_token
            .map(|t| [("default".to_owned(), t)].into_iter().collect()),
        read_tokens: args
            .read_token
            .map(|t| [("reader".to_owned(), t)].into_iter().collect()),
        shadow: args.shadow,
        shadow_connections: args.shadow_connections,
        shadow_queue: args.shadow_queue,
        shadow_timeout_ms: args.shadow_timeout_ms,
        authentication_timeout_seconds: args.authentication_timeout,
        max_logins_in_progress: args.max_logins_in_progress,
        auth_file: args.auth_file,
        auth_url: args.auth_url,
        auth_query: args.auth_query,
        merge_problems: Vec::new(),
    };
    let config = file.overridden_by(flags.clone()).validate()?;
    let running = listener::start(config).await?;
    eprintln!(
        "cutover: listening on {}{}",
        running.addr,
        running
            .admin_addr
            .map(|a| format!(", admin on http://{a}"))
            .unwrap_or_default()
    );
    let config_path = args.config.clone();
    running.set_config_source(Box::new(move || {
        // The file as it is now, under the same flags and environment.
        let file = match &config_path {
            Some(path) => FileConfig::from_toml(path),
            None => Ok(FileConfig::default()),
        };
        file.and_then(|f| f.overridden_by(flags.clone()).validate())
            .map_err(|e| e.to_string())
    }));
    let reload = running.reload_everything_handle();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let Ok(mut hup) = signal(SignalKind::hangup()) else {
            return;
        };
        while hup.recv().await.is_some() {
            eprintln!("cutover: SIGHUP, reloading the configuration and the rules");
            let done = reload();
            match done.config {
                Some(Err(e)) => eprintln!("cutover: the configuration was not reloaded: {e}"),
                Some(Ok(done)) => {
                    for key in &done.applied {
                        eprintln!("cutover: reloaded {key}");
                    }
                    if !done.need_restart.is_empty() {
                        eprintln!(
                            "cutover: changed, applied only by a restart: {}",
                            done.need_restart.join(", ")
                        );
                    }
                }
                None => {}
            }
        }
    });
    let token = running.shutdown_token();
    tokio::spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        eprintln!("cutover: shutting down");
        token.cancel();
    });
    running.wait().await;
    Ok(ExitCode::SUCCESS)
}

async fn rules_check(
    dir: &std::path::Path,
    database_url: Option<String>,
) -> anyhow::Result<ExitCode> {
    let set = match rules::RuleSet::load_dir(dir) {
        Ok(set) => set,
        Err(rules::RulesError(diagnostics)) => {
            for d in &diagnostics {
                println!("{d}");
            }
            eprintln!("{}: {} problem(s)", dir.display(), diagnostics.len());
            return Ok(ExitCode::from(1));
        }
    };
    if let Some(url) = database_url {
        let client = connect::connect(&connect::parse_url(&url)?).await?;
        let problems = rules::check_against_database(&client, &set).await?;
        if !problems.is_empty() {
            for d in &problems {
                println!("{d}");
            }
            eprintln!(
                "{}: {} problem(s) against the database",
                dir.display(),
                problems.len()
            );
            return Ok(ExitCode::from(1));
        }
    }
    println!(
        "{}: ok: {} → {}, {} query types, {} behaviour changes declared",
        dir.display(),
        set.table.legacy,
        set.table.target,
        set.query_types.len(),
        set.behaviour_changes.len()
    );
    Ok(ExitCode::SUCCESS)
}

fn ctl(admin: &str, token: Option<&str>, command: CtlCommand) -> anyhow::Result<ExitCode> {
    // Reading takes the admin token, or a read-only one.
    let reader = token
        .map(str::to_owned)
        .or_else(|| std::env::var("CUTOVER_READ_TOKEN").ok());
    use cutover::ctl::{self, Outcome};
    let outcome = match command {
        CtlCommand::Status { json } => ctl::status(admin, reader.as_deref(), json)?,
        CtlCommand::Set {
            query_type,
            stage,
            percent,
            reason,
            force,
            json,
        } => ctl::set(
            admin,
            token,
            &query_type,
            &stage,
            percent,
            &reason,
            force,
            json,
        )?,
        CtlCommand::History { limit, json } => ctl::history(admin, reader.as_deref(), limit, json)?,
        CtlCommand::Changes { json } => ctl::changes(admin, reader.as_deref(), json)?,
        CtlCommand::Accept { name, reason, json } => {
            ctl::accept(admin, token, &name, &reason, json)?
        }
        CtlCommand::Mark {
            query_type,
            kind,
            columns,
            class,
            note,
            json,
        } => ctl::mark(
            admin,
            token,
            &cutover::divergence::MarkRequest {
                query_type,
                kind,
                columns,
                class,
                note,
            },
            json,
        )?,
    };
    Ok(match outcome {
        Outcome::Done(text) => {
            print!("{text}");
            ExitCode::SUCCESS
        }
        Outcome::Refused(text) => {
            print!("{text}");
            ExitCode::from(1)
        }
    })
}

fn rules_explain(sql: &str, dir: &std::path::Path, json: bool) -> anyhow::Result<ExitCode> {
    let set = std::sync::Arc::new(rules::RuleSet::load_dir(dir)?);
    let classifier = cutover::classify::Classifier::new(set);
    let explained = cutover::classify::explain(&classifier, sql);
    if json {
        println!("{}", serde_json::to_string_pretty(&explained)?);
    } else {
        print!("{}", explained);
    }
    Ok(ExitCode::SUCCESS)
}
