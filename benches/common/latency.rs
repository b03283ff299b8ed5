//! One client's round trips through several targets, interleaved query by query: each pass
//! sends one query to every target in turn, so that whatever slows the machine down for a
//! while slows every target alike, and the time a proxy adds is read against direct's in the
//! same pass. Each pass goes in an order of its own (shuffled, the same every run): work a
//! target leaves behind (the shadow's comparisons after a read) lands on every other target
//! alike, not always on the one after it.

use std::time::{Duration, Instant};

/// Where one client's queries go, and which.
pub struct Target {
    pub label: String,
    pub port: u16,
    pub database: String,
    /// One `$1` bigint parameter.
    pub sql: String,
}

/// What one target's round trips took.
pub struct Trips {
    pub label: String,
    /// Each round trip, in the order made.
    pub times: Vec<Duration>,
}

impl Trips {
    /// The `q` quantile (0–1) of its round trips, in microseconds.
    pub fn quantile_us(&self, q: f64) -> f64 {
        let mut v: Vec<f64> = self.times.iter().map(|d| d.as_secs_f64() * 1e6).collect();
        v.sort_by(f64::total_cmp);
        v[((v.len() - 1) as f64 * q).round() as usize]
    }

    /// The median of what each pass's round trip took beyond `base`'s in the same pass, in
    /// microseconds.
    pub fn added_us(&self, base: &Trips) -> f64 {
        let mut v: Vec<f64> = self
            .times
            .iter()
            .zip(&base.times)
            .map(|(t, b)| (t.as_secs_f64() - b.as_secs_f64()) * 1e6)
            .collect();
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    }
}

/// `passes` passes over every target (each its prepared statement, its `$1` drawn from
/// 1..=`ids`, the same in a pass), after `warm` passes not kept.
pub async fn interleaved(targets: &[Target], ids: i64, warm: usize, passes: usize) -> Vec<Trips> {
    let mut clients = Vec::new();
    for t in targets {
        let mut config = tokio_postgres::Config::new();
        config
            .host("127.0.0.1")
            .port(t.port)
            .user("postgres")
            .dbname(&t.database);
        let (client, connection) = config
            .connect(tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|e| panic!("connect to {}: {e}", t.label));
        tokio::spawn(connection);
        let statement = client.prepare(&t.sql).await.expect("prepare");
        clients.push((client, statement));
    }
    let mut trips: Vec<Trips> = targets
        .iter()
        .map(|t| Trips {
            label: t.label.clone(),
            times: Vec::with_capacity(passes),
        })
        .collect();
    let n = targets.len();
    let mut order: Vec<usize> = (0..n).collect();
    let mut seed = 0x9e37_79b9_7f4a_7c15_u64;
    for pass in 0..warm + passes {
        let id = 1 + (pass as i64 * 7919) % ids;
        shuffle(&mut order, &mut seed);
        for &i in &order {
            let (client, statement) = &clients[i];
            let start = Instant::now();
            client.query(statement, &[&id]).await.expect("query");
            if pass >= warm {
                trips[i].times.push(start.elapsed());
            }
        }
    }
    trips
}

/// Shuffles `order` (Fisher–Yates) with a generator in `state` (xorshift64): the same orders
/// every run.
fn shuffle(order: &mut [usize], state: &mut u64) {
    for i in (1..order.len()).rev() {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        order.swap(i, (*state % (i as u64 + 1)) as usize);
    }
}
