//! `cutover demo`: the whole migration, end to end, on a private PostgreSQL it starts itself —
//! the customer's phases with the real commands' code paths:
//!
//! 1. prepare: a throwaway cluster, the legacy table with a generated Fature tree (with the
//!    anomalies real data has: drifted counters, orphans), `migrate`;
//! 2. the proxy starts in front of it and the application's traffic runs through it
//!    (concurrent clients: reads prepared and inline, writes in transactions);
//! 3. dual-write on (the write types to `shadow`, through the admin API), then `backfill`
//!    under that load, then `verify`;
//! 4. the read types to `shadow`: every read compared on both schemas;
//! 5. once the evidence is in (the gate: 1,000 comparisons at 95%), each walked type is raised
//!    `cutover 10%` → `50%` → `target` through the admin API — the real gate answers;
//! 6. the divergence report (HTML and Markdown), a final `verify`, and the proxy left up for
//!    `psql` until Ctrl-C (or `--exit-after`).
//!
//! The cluster is removed on every way out (its owner's drop, and a watchdog if the process
//! dies).

pub mod fixture;
pub mod localpg;
mod workload;

use std::{
    path::PathBuf,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering::Relaxed},
    },
    time::{Duration, Instant},
};

use anyhow::Context;

use crate::{
    config::FileConfig,
    demo::fixture::TreeSpec,
    demo::localpg::{LocalPg, Options as PgOptions},
    migrate,
    net::connect,
    routing::rules::RuleSet,
};

/// `cutover demo` options.
#[derive(Debug, Clone)]
pub struct Options {
    pub affiliates: u64,
    pub clients: u64,
    /// Leave the proxy up this long after the walk, then exit (default: until Ctrl-C).
    pub exit_after: Option<Duration>,
    /// Where the report is written.
    pub out: PathBuf,
}

/// The read types the demo walks to `target` (the others stay compared in `shadow`).
const WALKED: &[&str] = &[
    "affiliate_by_id",
    "affiliate_by_external_id",
    "financial_summary",
    "upline",
];
/// Read types put in `shadow` and compared, but not walked (their legacy side is a
/// sequential scan of the unindexed parent column: slow to gather 1,000 samples).
const COMPARED: &[&str] = &["direct_referrals", "network_size", "count_active"];
/// Write types: in `shadow`, their statements are dual-written.
const WRITES: &[&str] = &[
    "new_affiliate",
    "bump_parent_referrals",
    "record_deposit",
    "set_status",
];

const RULES: &str = include_str!("../../rules/fature.toml");
const TOKEN_NAME: &str = "demo";

fn step(n: u32, what: &str) {
    println!("\n[{n}/6] {what}");
}

/// Runs the demo; Ctrl-C at any point ends it, removing the private cluster (dropping the
/// walk drops the cluster's owner).
pub async fn run(options: Options) -> anyhow::Result<()> {
    tokio::select! {
        result = walk(options) => result,
        _ = tokio::signal::ctrl_c() => {
            eprintln!("\ninterrupted: stopping the proxy and removing the private PostgreSQL");
            Ok(())
        }
    }
}

async fn walk(options: Options) -> anyhow::Result<()> {
    let started = Instant::now();
    step(
        1,
        "prepare: a private PostgreSQL, the legacy table, the fature_v2 schema",
    );
    let pg = tokio::task::spawn_blocking(|| LocalPg::start_with(PgOptions::default()))
        .await
        .context("start PostgreSQL")??;
    println!(
        "  PostgreSQL on 127.0.0.1:{} (removed when the demo ends)",
        pg.port()
    );
    let config = pg.config("postgres");
    let admin_client = connect::connect(&config).await?;
    fixture::create_legacy_table(&admin_client).await?;
    let spec = TreeSpec {
        orphans: 3,
        drifted_counters: (options.affiliates / 500).max(5),
        ..TreeSpec::clean(options.affiliates)
    };
    let generated = fixture::load(&admin_client, &spec).await?;
    println!(
        "  public.affiliates: {} affiliates ({} with a drifted level_1_referrals, {} orphans)",
        options.affiliates,
        spec.drifted_counters,
        generated.orphans.len()
    );
    let report = migrate::run(&config, &migrate::MigrationSet::embedded(), false).await?;
    println!(
        "  cutover migrate: {} migrations applied",
        report.applied.len()
    );

    step(
        2,
        "the proxy in front, the application's traffic through it",
    );
    let rules_dir = tempfile::tempdir()?;
    std::fs::write(rules_dir.path().join("fature.toml"), RULES)?;
    let rules = RuleSet::load_dir(rules_dir.path())?;
    let token = format!("demo-{:032x}", rand::random::<u128>());
    let file = FileConfig {
        listen: Some("127.0.0.1:0".into()),
        admin: Some("127.0.0.1:0".into()),
        upstream: Some(pg.url("postgres")),
        rules: Some(rules_dir.path().to_owned()),
        shutdown_grace_seconds: Some(1),
        admin_tokens: Some(
            [(TOKEN_NAME.to_owned(), token.clone())]
                .into_iter()
                .collect(),
        ),
        ..FileConfig::default()
    };
    let proxy = crate::serve::start(file.validate().map_err(|e| anyhow::anyhow!("{e}"))?).await?;
    let admin = proxy
        .admin_addr
        .context("the admin endpoint is on")?
        .to_string();
    let app_url = format!(
        "postgres://postgres@127.0.0.1:{}/postgres",
        proxy.addr.port()
    );
    println!("  cutover serve: {app_url}  (admin http://{admin})");

    let counts = Arc::new(workload::Counts::default());
    let stop = Arc::new(AtomicBool::new(false));
    let app_config = connect::parse_url(&app_url)?;
    let mut clients = Vec::new();
    for n in 0..options.clients {
        let client = connect::connect(&app_config).await?;
        clients.push(tokio::spawn(workload::client(
            client,
            n,
            options.affiliates as i64,
            0.1,
            Arc::clone(&counts),
            Arc::clone(&stop),
        )));
    }
    println!(
        "  {} clients running the app's statements (90% reads, 10% writes)",
        options.clients
    );

    let result = async {
        step(3, "dual-write on, backfill under load, verify");
        for qt in WRITES {
            set_stage(&admin, &token, qt, "shadow", None, "demo: dual-write on").await?;
        }
        println!("  write types in shadow: every write on legacy is mirrored into v2 at COMMIT");
        let summary = migrate::backfill::run(
            &admin_client,
            &config,
            &rules.table,
            &migrate::backfill::Options {
                batch: migrate::backfill::DEFAULT_BATCH,
                dry_run: false,
                progress: crate::migrate::progress::Show::Nothing,
                abort_after_batches: None,
            },
        )
        .await?;
        admin_client.batch_execute("RESET cutover.mirroring").await?;
        println!(
            "  cutover backfill: {} rows copied in {:.1} s, {} quarantined (orphans), {} written meanwhile caught up",
            summary.copied,
            summary.seconds,
            summary.quarantined.len(),
            summary.caught_up
        );
        let verified = migrate::verify::verify(&admin_client, &rules.table, 10_000).await?;
        migrate::verify::record(&admin_client, &verified).await?;
        println!(
            "  cutover verify: {} legacy rows, {} in v2, {} missing, {} different, {} quarantined — {}",
            verified.legacy_rows,
            verified.target_rows,
            verified.missing.count,
            verified.different.count,
            verified.quarantined,
            if verified.ok { "clean" } else { "DRIFT (see `cutover verify`)" }
        );

        step(4, "shadow: reads compared on both schemas");
        for qt in WALKED.iter().chain(COMPARED) {
            set_stage(&admin, &token, qt, "shadow", None, "demo: compare").await?;
        }
        wait_for_evidence(&admin_client, &counts).await?;

        println!("  v2 answers differently on purpose here (rules' [[behaviour_change]]); a reviewer accepts:");
        for c in &rules.behaviour_changes {
            accept(&admin, &token, &c.name, "demo: v2's behaviour is the intended one").await?;
        }
        step(5, "gradual cutover through the gate: 10% → 50% → target");
        let mut before = proxy_metrics(&admin).await;
        for (stage, percent) in [("cutover", Some(10)), ("cutover", Some(50)), ("target", None)] {
            for qt in WALKED {
                let to = percent.map_or(stage.to_owned(), |p| format!("{stage} {p}%"));
                match set_stage(&admin, &token, qt, stage, percent, &format!("demo: {to}")).await {
                    Ok(()) => {}
                    Err(e) => println!("  {qt}: {e}"),
                }
            }
            tokio::time::sleep(Duration::from_secs(4)).await;
            let after = proxy_metrics(&admin).await;
            print_served(&before, &after, stage, percent);
            before = after;
        }
        anyhow::Ok(())
    }
    .await;

    stop.store(true, Relaxed);
    for c in clients {
        let _ = c.await;
    }
    result?;

    step(6, "the evidence");
    let report =
        crate::report::gather(&admin_client, Duration::from_secs(3600), Some(&rules)).await?;
    print!("{}", summary(&report));
    println!(
        "  (count_active's confirmed divergences are real: legacy counts the orphans the backfill\n   quarantined, v2 does not have them — `cutover verify` lists them as quarantined.\n   `dropped`: comparisons the shadow pool could not take at this load; the app never waited.)"
    );
    std::fs::create_dir_all(&options.out)?;
    let mut written = Vec::new();
    for (format, name) in [
        (crate::report::render::Format::Html, "cutover-report.html"),
        (crate::report::render::Format::Markdown, "cutover-report.md"),
    ] {
        let path = options.out.join(name);
        std::fs::write(
            &path,
            crate::report::render::render(&report, format, crate::report::Lang::En),
        )?;
        written.push(path);
    }
    let verified = migrate::verify::verify(&admin_client, &rules.table, 10_000).await?;
    migrate::verify::record(&admin_client, &verified).await?;
    println!(
        "\n  final cutover verify: {}; {} reads and {} writes went through the proxy ({} errors)",
        if verified.ok { "clean" } else { "DRIFT" },
        counts.reads.load(Relaxed),
        counts.writes.load(Relaxed),
        counts.errors.load(Relaxed)
    );
    for path in &written {
        println!("  report: {}", path.display());
    }
    println!("  whole demo: {:.0} s", started.elapsed().as_secs_f64());

    println!("\nThe proxy is still up:");
    println!("  psql \"{app_url}\"                      # the application's view");
    println!(
        "  psql \"postgres://{TOKEN_NAME}@127.0.0.1:{}/cutover\"   # the admin console (password: {token})",
        proxy.addr.port()
    );
    println!("  CUTOVER_ADMIN_TOKEN={token} cutover ctl --admin {admin} status");
    println!(
        "  http://{admin}/status                # the live report (any user, password: {token})"
    );
    println!("  curl http://{admin}/metrics");
    match options.exit_after {
        Some(d) => {
            println!("(exiting in {} s)", d.as_secs());
            tokio::select! {
                _ = tokio::time::sleep(d) => {}
                _ = tokio::signal::ctrl_c() => {}
            }
        }
        None => {
            println!("Ctrl-C to stop (the private PostgreSQL is removed).");
            let _ = tokio::signal::ctrl_c().await;
        }
    }
    proxy.shutdown().await;
    drop(pg);
    Ok(())
}

/// A stage change through the admin API, as an operator makes it (blocking HTTP, off the
/// runtime's threads).
async fn set_stage(
    admin: &str,
    token: &str,
    query_type: &str,
    stage: &str,
    percent: Option<u8>,
    reason: &str,
) -> anyhow::Result<()> {
    let (admin, token, qt, stage, reason) = (
        admin.to_owned(),
        token.to_owned(),
        query_type.to_owned(),
        stage.to_owned(),
        reason.to_owned(),
    );
    let outcome = tokio::task::spawn_blocking(move || {
        crate::admin::ctl::set(
            &admin,
            Some(&token),
            &qt,
            &stage,
            percent,
            &reason,
            false,
            false,
        )
    })
    .await??;
    printed(outcome)
}

/// What `ctl` answered, printed; a refusal is an error.
fn printed(outcome: crate::admin::ctl::Outcome) -> anyhow::Result<()> {
    match outcome {
        crate::admin::ctl::Outcome::Done(text) => {
            print!("  {text}");
            Ok(())
        }
        crate::admin::ctl::Outcome::Refused(text) => anyhow::bail!("{}", text.trim()),
    }
}

/// A reviewer's acceptance of a declared behaviour change, through the admin API.
async fn accept(admin: &str, token: &str, name: &str, reason: &str) -> anyhow::Result<()> {
    let (admin, token, name, reason) = (
        admin.to_owned(),
        token.to_owned(),
        name.to_owned(),
        reason.to_owned(),
    );
    let outcome = tokio::task::spawn_blocking(move || {
        crate::admin::ctl::accept(&admin, Some(&token), &name, &reason, false)
    })
    .await??;
    printed(outcome)
}

/// Waits until every walked type has the gate's evidence, printing progress.
async fn wait_for_evidence(
    client: &tokio_postgres::Client,
    counts: &workload::Counts,
) -> anyhow::Result<()> {
    let need = crate::control::GATE_MIN_SAMPLES;
    let deadline = Instant::now() + Duration::from_secs(150);
    loop {
        tokio::time::sleep(Duration::from_secs(3)).await;
        let mut line = Vec::new();
        let mut ready = true;
        for qt in WALKED {
            // What the gate itself will read.
            let (samples, agreeing) = crate::control::window_samples(client, qt).await?;
            ready &= samples >= need;
            let rate = if samples > 0 {
                agreeing as f64 * 100.0 / samples as f64
            } else {
                0.0
            };
            line.push(format!("{qt} {}/{need} ({rate:.1}%)", samples.min(need)));
        }
        println!(
            "  compared: {}   [{} reads so far]",
            line.join(", "),
            counts.reads.load(Relaxed)
        );
        if ready {
            return Ok(());
        }
        if Instant::now() > deadline {
            anyhow::bail!("the shadow did not gather the gate's evidence in time");
        }
    }
}

async fn proxy_metrics(admin: &str) -> String {
    let admin = admin.to_owned();
    tokio::task::spawn_blocking(move || {
        ureq::get(&format!("http://{admin}/metrics"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default()
    })
    .await
    .unwrap_or_default()
}

/// The share each walked type's target served between two scrapes.
fn print_served(before: &str, after: &str, stage: &str, percent: Option<u8>) {
    let parts: Vec<String> = WALKED
        .iter()
        .map(|qt| {
            let side = |s: &str| {
                let series =
                    format!("cutover_queries_total{{query_type=\"{qt}\",served_by=\"{s}\"}}");
                crate::metrics::scraped(after, &series) - crate::metrics::scraped(before, &series)
            };
            let (l, t) = (side("legacy"), side("target"));
            format!("{qt} {:.0}% by target", t * 100.0 / (l + t).max(1.0))
        })
        .collect();
    let at = percent.map_or(stage.to_owned(), |p| format!("{stage} {p}%"));
    println!("  at {at}, the last 4 s: {}", parts.join(", "));
}

/// What the shadow found, per query type that it compared, as a table for the terminal.
fn summary(report: &crate::report::Report) -> String {
    let mut out = String::from(
        "| query type | stage | matched | expected | confirmed (drift, undetermined) | transient | nondeterministic | skipped | dropped | legacy ms | target ms |\n|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    let ms = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("{v:.2}"));
    for q in &report.query_types {
        let o = &q.outcomes;
        let compared = o.matched + o.expected + o.confirmed + o.transient;
        if compared + o.nondeterministic + o.skipped + o.dropped == 0 {
            continue;
        }
        out.push_str(&format!(
            "| {} | {} | {} | {} | {} ({}, {}) | {} | {} | {} | {} | {} | {} |\n",
            q.query_type,
            q.stage,
            o.matched,
            o.expected,
            o.confirmed,
            o.drift,
            o.undetermined,
            o.transient,
            o.nondeterministic,
            o.skipped,
            o.dropped,
            ms(q.legacy.mean_ms),
            ms(q.target.mean_ms),
        ));
    }
    out
}
