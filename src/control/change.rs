//! Stage changes: asked for through a replica (the admin API, the console), checked against
//! the safety gates, written with their audit row in one transaction.

use serde::Serialize;
use tokio_postgres::{Client, error::SqlState};

use super::{Control, behaviour, read_committed, served_by_target};
use crate::routing::rules::{RuleSet, Stage, stage_columns, stage_label, stage_of};

/// A stage change asked for.
#[derive(Debug, Clone)]
pub struct Change {
    pub query_type: String,
    pub stage: Stage,
    pub reason: String,
    /// Who: the API token's name, the SQL user, or `auto`.
    pub who: String,
    pub via: &'static str,
    pub force: bool,
    /// The query type writes: the shadow does not compare writes, so its gate is a clean
    /// `cutover verify` in the gate's window instead of compared samples.
    pub writes: bool,
    /// The behaviour changes the rules declare for it (and the kinds they do not).
    pub declared: behaviour::Declared,
}

/// The safety gate's bar (design.md): in the current window, this many compared samples
/// and this confirmed-match rate before a query type may serve more from the target.
pub const GATE_MIN_SAMPLES: i64 = 1000;
pub const GATE_MIN_MATCH_RATE: f64 = 0.95;
/// The gate refuses to raise a read type whose target p99 is more than this many times
/// legacy's in the window (issue 16: a migration must not make the application slower
/// without someone deciding so).
pub const GATE_MAX_P99_RATIO: f64 = 2.0;
/// Timed comparisons each side needs before its p99 is held against it.
pub const GATE_MIN_TIMED: i64 = 100;

/// What a change did, or why it was refused.
#[derive(Debug, Serialize)]
pub struct Changed {
    pub query_type: String,
    pub from: Option<String>,
    pub to: String,
    pub forced: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ChangeError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "no query type {0:?} (not in the rules, and not an automatic type the shadow has seen)"
    )]
    UnknownQueryType(String),
    #[error("no control database: start the proxy with --control (or a user in the upstream URL)")]
    NoControlDatabase,
    #[error(transparent)]
    Unreachable(#[from] crate::net::connect::ConnectError),
    #[error(
        "refused by the safety gate: {samples} compared samples in the current window (need {min}), confirmed-match rate {rate} (need {bar:.0}%); force it with a reason if you must"
    )]
    Gate {
        samples: i64,
        min: i64,
        rate: String,
        bar: f64,
    },
    #[error(
        "refused by the safety gate: a write type moves on the evidence of a clean `cutover verify` in the last hour, and {last}; run it, or force with a reason if you must"
    )]
    WriteGate { last: String },
    #[error(
        "refused: v2 cannot serve before a backfill has completed ({state}); every write until then is handed to the backfill, so v2 would answer with rows it does not have yet. Run `cutover backfill` (forcing does not lift this)"
    )]
    NotBackfilled { state: String },
    #[error(
        "refused by the gate: v2 behaves differently here on purpose ({change}, {kind}; seen {observed} times) and no reviewer has accepted it: `cutover ctl accept {change} --reason …` (the report and `rules explain` say what it means), or force with a reason"
    )]
    Unaccepted {
        change: String,
        kind: crate::routing::rules::changes::ChangeKind,
        observed: i64,
    },
    #[error(
        "refused by the gate: v2 behaved differently {observed} times ({kind}) and the rules declare no behaviour change of that kind: declare it ([[behaviour_change]], docs/rules.md) and have it accepted, or force with a reason"
    )]
    Undeclared {
        kind: crate::routing::rules::changes::ChangeKind,
        observed: i64,
    },
    #[error(
        "refused by the gate: v2 is slower here: p99 {target_ms} ms against legacy's {legacy_ms} ms in the current window (the bar: at most {GATE_MAX_P99_RATIO}×). `cutover report` gives both sides' latency and the target's plan; give v2 what it needs (an index in a migration, a better target in the rules), or force with a reason if the slowdown is accepted"
    )]
    Slower { legacy_ms: f64, target_ms: f64 },
    #[error("no behaviour change {0:?} in the rules")]
    UnknownBehaviourChange(String),
    /// Switching dual-write's triggers waited too long for the application's writers
    /// (migration 0024): nothing changed; retry.
    #[error("not changed: {0}")]
    Busy(String),
    #[error(transparent)]
    Database(#[from] tokio_postgres::Error),
}

/// What kind of failure a [`ChangeError`] is, for each surface to answer in its own terms
/// (an HTTP status, a SQLSTATE).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The request itself is wrong.
    Invalid,
    /// It names a query type or behaviour change nobody knows.
    Unknown,
    /// A safety gate refused it.
    Refused,
    /// The control database cannot be reached or failed.
    Unavailable,
    /// The change waited too long for a lock and did nothing: retry.
    Busy,
}

impl ChangeError {
    /// The message, and for a name nobody knows, where the surface (`listed`: its commands
    /// that list query types, then behaviour changes) lists the known ones.
    pub fn explained(&self, listed: [&str; 2]) -> String {
        match self {
            ChangeError::UnknownQueryType(_) => format!("{self} ({} lists them)", listed[0]),
            ChangeError::UnknownBehaviourChange(_) => format!("{self} ({} lists them)", listed[1]),
            _ => self.to_string(),
        }
    }

    /// The kind of failure (one exhaustive match: a new variant is placed here, once).
    pub fn failure(&self) -> Failure {
        match self {
            ChangeError::Invalid(_) => Failure::Invalid,
            ChangeError::UnknownQueryType(_) | ChangeError::UnknownBehaviourChange(_) => {
                Failure::Unknown
            }
            ChangeError::Gate { .. }
            | ChangeError::WriteGate { .. }
            | ChangeError::NotBackfilled { .. }
            | ChangeError::Unaccepted { .. }
            | ChangeError::Undeclared { .. }
            | ChangeError::Slower { .. } => Failure::Refused,
            ChangeError::NoControlDatabase
            | ChangeError::Unreachable(_)
            | ChangeError::Database(_) => Failure::Unavailable,
            ChangeError::Busy(_) => Failure::Busy,
        }
    }
}

/// A change asked of this proxy (admin API, SQL console): the query type must be one the
/// rules or the live state know, the stage valid; then [`set_stage`] on the control
/// database.
#[allow(clippy::too_many_arguments)]
pub async fn request_change(
    control: &Control,
    rules: &RuleSet,
    query_type: String,
    stage: &str,
    percent: Option<i64>,
    reason: String,
    who: &str,
    via: &'static str,
    force: bool,
) -> Result<Changed, ChangeError> {
    let known = rules.query_types.iter().any(|qt| qt.name == query_type)
        || control.live().by_type.contains_key(&query_type);
    // An automatic query type (`fp_` and 16 hex digits): known once the shadow has seen it.
    let automatic = !known
        && query_type.len() == 19
        && query_type.starts_with("fp_")
        && query_type[3..].bytes().all(|b| b.is_ascii_hexdigit());
    if !known && !automatic {
        return Err(ChangeError::UnknownQueryType(query_type));
    }
    let stage = stage_of(stage, percent).map_err(ChangeError::Invalid)?;
    let mut client = control.connect().await?;
    if automatic
        && !client
            .query_one(
                "SELECT EXISTS (SELECT 1 FROM cutover.fingerprints WHERE fingerprint = $1)
                     OR EXISTS (SELECT 1 FROM cutover.comparison_stats WHERE query_type = $1)",
                &[&query_type],
            )
            .await?
            .get::<_, bool>(0)
    {
        return Err(ChangeError::UnknownQueryType(query_type));
    }
    let change = Change {
        writes: rules.writes(&query_type).unwrap_or(false),
        declared: behaviour::Declared::of(rules, &query_type),
        query_type,
        stage,
        reason,
        who: who.to_owned(),
        via,
        force,
    };
    let changed = set_stage(&mut client, &change).await?;
    tracing::info!(query_type = %changed.query_type, from = ?changed.from, to = %changed.to, %who, via, forced = changed.forced, "stage changed");
    Ok(changed)
}

/// Changes one query type's stage: checks the gate (unless forced), writes the new state
/// and its audit row, in one transaction (the notify trigger tells every replica).
pub async fn set_stage(client: &mut Client, change: &Change) -> Result<Changed, ChangeError> {
    if change.reason.trim().is_empty() {
        return Err(ChangeError::Invalid("a reason is required".into()));
    }
    let tx = read_committed(client).await?;
    let current = tx
        .query_opt(
            "SELECT stage, percent FROM cutover.query_type_state WHERE query_type = $1 FOR UPDATE",
            &[&change.query_type],
        )
        .await?;
    let from = match &current {
        Some(row) => {
            let (stage, percent): (String, i16) = (row.get(0), row.get(1));
            let percent = (stage == "cutover").then_some(i64::from(percent));
            Some(stage_of(&stage, percent).map_err(ChangeError::Invalid)?)
        }
        None => None,
    };
    if from == Some(change.stage) {
        // Already there (another replica, or a repeated command): nothing to record.
        tx.commit().await?;
        return Ok(Changed {
            query_type: change.query_type.clone(),
            from: from.map(|s| s.to_string()),
            to: change.stage.to_string(),
            forced: false,
        });
    }
    let raise = served_by_target(change.stage) > from.map_or(0, served_by_target);
    if raise {
        backfilled(&tx).await?;
        if !change.force {
            behaviour::gate(&tx, &change.declared).await?;
        }
    }
    if raise && !change.force && change.writes {
        match window_verify(&tx).await? {
            Some((true, _)) => {}
            Some((false, at)) => {
                return Err(ChangeError::WriteGate {
                    last: format!("the last one ({at} UTC) found drift"),
                });
            }
            None => {
                return Err(ChangeError::WriteGate {
                    last: "there was none".into(),
                });
            }
        }
    } else if raise && !change.force {
        let (samples, matched) = window_samples(&tx, &change.query_type).await?;
        let rate = if samples > 0 {
            matched as f64 / samples as f64
        } else {
            0.0
        };
        if samples < GATE_MIN_SAMPLES || rate < GATE_MIN_MATCH_RATE {
            return Err(ChangeError::Gate {
                samples,
                min: GATE_MIN_SAMPLES,
                rate: if samples > 0 {
                    format!("{:.1}%", rate * 100.0)
                } else {
                    "n/a".into()
                },
                bar: GATE_MIN_MATCH_RATE * 100.0,
            });
        }
        let (legacy, target) = window_latency(&tx, &change.query_type).await?;
        if let Some((legacy_ms, target_ms)) = slower_than_the_bar(&legacy, &target) {
            return Err(ChangeError::Slower {
                legacy_ms,
                target_ms,
            });
        }
    }
    let (stage, percent) = stage_columns(change.stage);
    tx.execute(
        "INSERT INTO cutover.query_type_state (query_type, stage, percent, updated_at)
         VALUES ($1, $2, $3, now())
         ON CONFLICT (query_type) DO UPDATE
             SET stage = EXCLUDED.stage, percent = EXCLUDED.percent, updated_at = now()",
        &[&change.query_type, &stage, &percent],
    )
    .await
    .map_err(|e| match e.as_db_error() {
        Some(db) if *db.code() == SqlState::LOCK_NOT_AVAILABLE => {
            ChangeError::Busy(db.message().to_owned())
        }
        _ => ChangeError::Database(e),
    })?;
    let (from_stage, from_percent) = match from.map(stage_columns) {
        Some((s, p)) => (Some(s), Some(p)),
        None => (None, None),
    };
    tx.execute(
        "INSERT INTO cutover.stage_audit
             (query_type, from_stage, from_percent, to_stage, to_percent, reason, changed_by, via, forced)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        &[
            &change.query_type,
            &from_stage,
            &from_percent,
            &stage,
            &percent,
            &change.reason,
            &change.who,
            &change.via,
            &(change.force && raise),
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(Changed {
        query_type: change.query_type.clone(),
        from: from.map(|s| s.to_string()),
        to: change.stage.to_string(),
        forced: change.force && raise,
    })
}

/// Nothing serves from the target before a backfill has completed, forced or not: until then
/// dual-write hands every write to the backfill instead of v2.
async fn backfilled(client: &impl tokio_postgres::GenericClient) -> Result<(), ChangeError> {
    let phase: Option<String> = client
        .query_opt("SELECT phase FROM cutover.backfill_progress", &[])
        .await?
        .map(|r| r.get(0));
    match phase.as_deref() {
        Some("done") => Ok(()),
        Some(phase) => Err(ChangeError::NotBackfilled {
            state: format!("the last one stopped in its {phase} phase; run it again to finish"),
        }),
        None => Err(ChangeError::NotBackfilled {
            state: "none has run".into(),
        }),
    }
}

/// The gate's window.
pub const GATE_WINDOW: &str = "1 hour";

/// Compared samples with a verdict (matched, expected by reviewers, confirmed) and the
/// agreeing ones (matched or expected), of a query type in the gate's window (`cutover.comparison_stats`, written by the shadow).
pub async fn window_samples(
    client: &impl tokio_postgres::GenericClient,
    query_type: &str,
) -> Result<(i64, i64), tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT coalesce(sum(matched + expected + confirmed), 0)::int8,
                        coalesce(sum(matched + expected), 0)::int8
                 FROM cutover.comparison_stats
                 WHERE query_type = $1 AND minute >= now() - interval '{GATE_WINDOW}'"
            ),
            &[&query_type],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// Both sides' latency histograms (`cutover.comparison_stats` buckets) of a query type's
/// timed comparisons in the gate's window.
pub async fn window_latency(
    client: &impl tokio_postgres::GenericClient,
    query_type: &str,
) -> Result<(Vec<i64>, Vec<i64>), tokio_postgres::Error> {
    let row = client
        .query_one(
            &format!(
                "SELECT coalesce(cutover.hist_sum(legacy_us_hist), '{{}}'),
                        coalesce(cutover.hist_sum(target_us_hist), '{{}}')
                 FROM cutover.comparison_stats
                 WHERE query_type = $1 AND minute >= now() - interval '{GATE_WINDOW}'"
            ),
            &[&query_type],
        )
        .await?;
    Ok((row.get(0), row.get(1)))
}

/// The gate's latency bar, on both sides' latency histograms: `Some((legacy, target))`, their
/// p99 in ms (the upper bound of its bucket), when each side has at least
/// [`GATE_MIN_TIMED`] timings and the target's p99 is more than [`GATE_MAX_P99_RATIO`] times
/// legacy's. The gate refuses on it; the report's verdict says it.
pub fn slower_than_the_bar(legacy: &[i64], target: &[i64]) -> Option<(f64, f64)> {
    let enough = |h: &[i64]| h.iter().sum::<i64>() >= GATE_MIN_TIMED;
    if !enough(legacy) || !enough(target) {
        return None;
    }
    let l = crate::shadow::divergence::percentile(legacy, 0.99)?;
    let t = crate::shadow::divergence::percentile(target, 0.99)?;
    (t > l * GATE_MAX_P99_RATIO).then_some((l, t))
}

/// The last `cutover verify` run in the gate's window: clean or not, and when (UTC) — the
/// evidence a write type is raised on.
pub async fn window_verify(
    client: &impl tokio_postgres::GenericClient,
) -> Result<Option<(bool, String)>, tokio_postgres::Error> {
    Ok(client
        .query_opt(
            &format!(
                "SELECT ok, to_char(ran_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI') FROM cutover.verify_runs
                 WHERE ran_at >= now() - interval '{GATE_WINDOW}' ORDER BY ran_at DESC LIMIT 1"
            ),
            &[],
        )
        .await?
        .map(|r| (r.get(0), r.get(1))))
}

/// `cutover rules promote`: the live stage of automatic type `from`, if it has one, given to
/// the rule `to` that now names its statements, with an audit row; the stage as people read
/// it.
pub async fn carry_stage(
    client: &mut Client,
    from: &str,
    to: &str,
) -> Result<Option<String>, tokio_postgres::Error> {
    let tx = read_committed(client).await?;
    let Some(row) = tx
        .query_opt(
            "SELECT stage, percent FROM cutover.query_type_state WHERE query_type = $1",
            &[&from],
        )
        .await?
    else {
        return Ok(None);
    };
    let (stage, percent): (String, i16) = (row.get(0), row.get(1));
    tx.execute(
        "INSERT INTO cutover.query_type_state (query_type, stage, percent, updated_at)
         VALUES ($1, $2, $3, now())
         ON CONFLICT (query_type) DO NOTHING",
        &[&to, &stage, &percent],
    )
    .await?;
    tx.execute(
        "INSERT INTO cutover.stage_audit
             (query_type, from_stage, from_percent, to_stage, to_percent, reason, changed_by, via, forced)
         VALUES ($1, NULL, NULL, $2, $3, $4, current_user, 'promote', false)",
        &[
            &to,
            &stage,
            &percent,
            &format!("promoted from the automatic query type {from}"),
        ],
    )
    .await?;
    tx.commit().await?;
    Ok(Some(stage_label(&stage, percent)))
}
