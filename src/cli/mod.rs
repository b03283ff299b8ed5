//! The `cutover` command line: the subcommands' arguments (clap), each run against the
//! library, and errors printed for people. `src/main.rs` only calls [`main`].

mod ctl;
mod rules_cmd;
mod serve_cmd;

use std::{path::PathBuf, process::ExitCode};

use clap::{Parser, Subcommand};

use crate::{migrate, net::connect, routing::rules};

use ctl::{CtlCommand, ctl};
use rules_cmd::{RulesCommand, rules_check, rules_explain};
use serve_cmd::ServeArgs;

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
        format: crate::report::render::Format,
        /// en or pt-BR
        #[arg(long, default_value = "en")]
        lang: crate::report::Lang,
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
        #[arg(long, default_value_t = crate::migrate::backfill::DEFAULT_BATCH)]
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
        #[arg(long, default_value_t = crate::migrate::verify::DEFAULT_CHUNK)]
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
        #[arg(long, default_value = crate::config::DEFAULT_ADMIN, value_name = "IP:PORT")]
        admin: String,
        /// Bearer token (one the proxy is configured with): an admin token, or a read token
        /// for status, history and changes [default: CUTOVER_ADMIN_TOKEN, else CUTOVER_READ_TOKEN]
        #[arg(long, env = "CUTOVER_ADMIN_TOKEN", hide_env_values = true)]
        token: Option<String>,
        #[command(subcommand)]
        command: CtlCommand,
    },
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

/// The `cutover` binary: logging, the runtime, the command, and its error printed as
/// `error: …` (exit 2) with a hint when one is known.
pub fn main() -> ExitCode {
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
        Command::Serve(args) => serve_cmd::run(*args).await,
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
                crate::demo::fixture::create_legacy_table(&client).await?;
            }
            let spec = crate::demo::fixture::TreeSpec {
                orphans: if anomalies { 3 } else { 0 },
                drifted_counters: if anomalies {
                    (affiliates / 500).max(5)
                } else {
                    0
                },
                shuffle_ids,
                ..crate::demo::fixture::TreeSpec::clean(affiliates)
            };
            let generated = crate::demo::fixture::load(&client, &spec).await?;
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
            let report = crate::report::gather(&client, since, rules.as_ref()).await?;
            let text = crate::report::render::render(&report, format, lang);
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
            crate::demo::run(crate::demo::Options {
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
            let mut client = connect::connect(&connect::parse_url(&database_url)?).await?;
            let done = crate::routing::rule_files::promote::promote(
                &client,
                &rules,
                &file,
                &fingerprint,
                &name,
            )
            .await?;
            println!("{}: added{}", done.file.display(), done.rule);
            // The live stage, under the new name (audited), so the type keeps where it was.
            match crate::control::carry_stage(&mut client, &fingerprint, &name).await? {
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
                let mut client = connect::connect(&config).await?;
                let new = crate::control::seed_query_types(&mut client, &rules).await?;
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
