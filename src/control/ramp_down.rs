//! The automatic ramp-down: a query type whose confirmed divergences pass the bar goes back
//! to `shadow`, audited as `auto`.

use tokio_postgres::Client;

use super::{Change, ChangeError, Changed, GATE_MIN_MATCH_RATE, behaviour, set_stage};
use crate::routing::rules::Stage;

/// When a query type serving from the target is sent back to shadow by itself: more than
/// this share of confirmed divergences among at least `min_samples` verdicts in the last
/// `window_minutes`.
#[derive(Debug, Clone, Copy)]
pub struct RampDown {
    pub max_divergence: f64,
    pub min_samples: i64,
    pub window_minutes: i32,
}

impl Default for RampDown {
    fn default() -> Self {
        Self {
            max_divergence: 1.0 - GATE_MIN_MATCH_RATE,
            min_samples: 100,
            window_minutes: 5,
        }
    }
}

/// Sends back to `shadow` every query type in `cutover` or `target` whose confirmed
/// divergences passed the bar, each with an audit row (`auto`); returns what it changed.
pub async fn ramp_down(client: &mut Client, bar: RampDown) -> Result<Vec<Changed>, ChangeError> {
    let diverging = client
        .query(
            "SELECT s.query_type, sum(c.confirmed)::int8, sum(c.matched + c.expected + c.confirmed)::int8
             FROM cutover.query_type_state s
             JOIN cutover.comparison_stats c ON c.query_type = s.query_type
             WHERE s.stage IN ('cutover', 'target')
               AND c.minute >= now() - make_interval(mins => $1::int4)
             GROUP BY s.query_type
             HAVING sum(c.matched + c.expected + c.confirmed)::int8 >= $2::int8
                AND sum(c.confirmed)::float8
                    / sum(c.matched + c.expected + c.confirmed)::float8 > $3::float8",
            &[&bar.window_minutes, &bar.min_samples, &bar.max_divergence],
        )
        .await?;
    let mut changed = Vec::new();
    for row in diverging {
        let (query_type, confirmed, samples): (String, i64, i64) =
            (row.get(0), row.get(1), row.get(2));
        let change = Change {
            query_type,
            stage: Stage::Shadow,
            reason: format!(
                "automatic ramp-down: {confirmed} confirmed divergences in {samples} compared samples ({:.1}%) over the last {} minutes, above {:.1}%",
                confirmed as f64 * 100.0 / samples as f64,
                bar.window_minutes,
                bar.max_divergence * 100.0
            ),
            who: "auto".into(),
            via: "auto",
            force: false,
            // A step back: no gate.
            writes: false,
            declared: behaviour::Declared::default(),
        };
        // Another replica may have done it already: the stage is read again under lock.
        let still = client
            .query_opt(
                "SELECT 1 FROM cutover.query_type_state
                 WHERE query_type = $1 AND stage IN ('cutover', 'target')",
                &[&change.query_type],
            )
            .await?;
        if still.is_some() {
            let done = set_stage(client, &change).await?;
            tracing::warn!(query_type = %done.query_type, from = ?done.from, reason = %change.reason, "query type ramped down to shadow");
            changed.push(done);
        }
    }
    Ok(changed)
}
