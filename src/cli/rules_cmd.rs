//! `cutover rules check|explain|promote`.

use std::{path::PathBuf, process::ExitCode};

use clap::Subcommand;

use crate::{net::connect, routing::rules};

#[derive(Subcommand)]
pub(super) enum RulesCommand {
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

pub(super) async fn rules_check(
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
        let problems = crate::routing::rule_files::check_against_database(&client, &set).await?;
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

pub(super) fn rules_explain(
    sql: &str,
    dir: &std::path::Path,
    json: bool,
) -> anyhow::Result<ExitCode> {
    let set = std::sync::Arc::new(rules::RuleSet::load_dir(dir)?);
    let classifier = crate::routing::classify::Classifier::new(set);
    let explained = crate::routing::classify::explain(&classifier, sql);
    if json {
        println!("{}", serde_json::to_string_pretty(&explained)?);
    } else {
        print!("{}", explained);
    }
    Ok(ExitCode::SUCCESS)
}
