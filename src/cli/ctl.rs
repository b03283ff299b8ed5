//! `cutover ctl`: operator commands against a running proxy's admin API.

use std::process::ExitCode;

use clap::Subcommand;

#[derive(Subcommand)]
pub(super) enum CtlCommand {
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

pub(super) fn ctl(
    admin: &str,
    token: Option<&str>,
    command: CtlCommand,
) -> anyhow::Result<ExitCode> {
    // Reading takes the admin token, or a read-only one.
    let reader = token
        .map(str::to_owned)
        .or_else(|| std::env::var("CUTOVER_READ_TOKEN").ok());
    use crate::admin::ctl::{self, Outcome};
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
            &crate::shadow::divergence::MarkRequest {
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
