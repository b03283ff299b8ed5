//! The Fature application's traffic (`../shared/workloads/fature_app.sql`), driven through the
//! proxy by concurrent clients: mostly reads of the statements the app sends, prepared and
//! with their values inline (the app uses both), and a share of writes — new affiliates with
//! their parent's counter bumped, deposits, status changes — in transactions.

use std::sync::{
    Arc,
    atomic::{AtomicBool, AtomicU64, Ordering::Relaxed},
};

use rand::{RngExt, SeedableRng, rngs::ChaCha8Rng};
use tokio_postgres::{Client, Statement};

/// The reads, with their weight in the mix.
const READS: &[(&str, u32)] = &[
    ("SELECT * FROM affiliates WHERE affiliate_id = $1", 30),
    (
        "SELECT affiliate_id, name, email, status FROM public.affiliates WHERE external_id = $1",
        12,
    ),
    (
        "SELECT a.affiliate_id, a.total_deposits, a.total_bets, a.total_withdrawals,
       a.total_cpa_earned + a.total_rev_earned AS total_earned
FROM affiliates a WHERE a.affiliate_id = $1",
        12,
    ),
    (
        "WITH RECURSIVE up AS (
    SELECT affiliate_id, parent_affiliate_id, 0 AS distance FROM affiliates WHERE affiliate_id = $1
    UNION ALL
    SELECT a.affiliate_id, a.parent_affiliate_id, up.distance + 1
    FROM affiliates a JOIN up ON a.affiliate_id = up.parent_affiliate_id
)
SELECT affiliate_id, distance FROM up WHERE distance > 0 ORDER BY distance",
        12,
    ),
    (
        "SELECT affiliate_id, name, registration_date FROM affiliates
WHERE parent_affiliate_id = $1 ORDER BY registration_date, affiliate_id",
        10,
    ),
    (
        "WITH RECURSIVE downline AS (
    SELECT affiliate_id, 1 AS depth FROM affiliates WHERE parent_affiliate_id = $1
    UNION ALL
    SELECT a.affiliate_id, d.depth + 1
    FROM affiliates a JOIN downline d ON a.parent_affiliate_id = d.affiliate_id
    WHERE d.depth < $2
)
SELECT COUNT(*) FROM downline",
        2,
    ),
    ("SELECT COUNT(*) FROM affiliates WHERE status = 'active'", 1),
];

const NEW_AFFILIATE: &str =
    "INSERT INTO affiliates (parent_affiliate_id, external_id, name, email, registration_date)
VALUES ($1, $2, $3, $4, now())
RETURNING affiliate_id";
const BUMP_PARENT: &str =
    "UPDATE affiliates SET level_1_referrals = level_1_referrals + 1, updated_at = now()
WHERE affiliate_id = $1";
const DEPOSIT: &str =
    "UPDATE affiliates SET total_deposits = total_deposits + $1, updated_at = now()
WHERE affiliate_id = $2";
const SET_STATUS: &str =
    "UPDATE affiliates SET status = $1, updated_at = now() WHERE affiliate_id = $2";

/// Counts of what the clients did.
#[derive(Default)]
pub struct Counts {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub errors: AtomicU64,
}

/// Runs one client until `stop`: `affiliates` is the highest id to pick from, `writes` the
/// share of transactions that write (0 to 1).
pub async fn client(
    client: Client,
    n: u64,
    affiliates: i64,
    writes: f64,
    counts: Arc<Counts>,
    stop: Arc<AtomicBool>,
) {
    let mut rng = ChaCha8Rng::seed_from_u64(n);
    let mut reads: Vec<Statement> = Vec::new();
    for (sql, _) in READS {
        match client.prepare(sql).await {
            Ok(s) => reads.push(s),
            Err(_) => {
                counts.errors.fetch_add(1, Relaxed);
                return;
            }
        }
    }
    let total: u32 = READS.iter().map(|(_, w)| w).sum();
    let mut serial = 0u64;
    while !stop.load(Relaxed) {
        let id: i64 = rng.random_range(1..=affiliates);
        let ok = if rng.random_bool(writes) {
            serial += 1;
            let done = write(&client, &mut rng, id, n, serial).await;
            counts.writes.fetch_add(1, Relaxed);
            done
        } else {
            let mut pick = rng.random_range(0..total);
            let i = READS
                .iter()
                .position(|(_, w)| {
                    if pick < *w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .unwrap_or(0);
            counts.reads.fetch_add(1, Relaxed);
            match i {
                // The app also sends this one with its value inline (simple protocol).
                0 if rng.random_bool(0.2) => client
                    .simple_query(&format!(
                        "SELECT * FROM affiliates WHERE affiliate_id = {id}"
                    ))
                    .await
                    .map(drop),
                1 => client
                    .query(&reads[1], &[&format!("aff-{id:08}")])
                    .await
                    .map(drop),
                5 => client.query(&reads[5], &[&id, &3i32]).await.map(drop),
                6 => client.query(&reads[6], &[]).await.map(drop),
                i => client.query(&reads[i], &[&id]).await.map(drop),
            }
            .is_ok()
        };
        if !ok {
            counts.errors.fetch_add(1, Relaxed);
        }
    }
}

async fn write(client: &Client, rng: &mut ChaCha8Rng, id: i64, n: u64, serial: u64) -> bool {
    let result = match rng.random_range(0..3) {
        0 => {
            let external = format!("demo-{n}-{serial}");
            let name = format!("Demo Affiliate {n}-{serial}");
            let email = format!("demo.{n}.{serial}@example.com");
            async {
                client.batch_execute("BEGIN").await?;
                client
                    .query_one(NEW_AFFILIATE, &[&id, &external, &name, &email])
                    .await?;
                client.execute(BUMP_PARENT, &[&id]).await?;
                client.batch_execute("COMMIT").await
            }
            .await
        }
        1 => {
            let cents = rust_decimal::Decimal::new(rng.random_range(100..100_000), 2);
            client.execute(DEPOSIT, &[&cents, &id]).await.map(drop)
        }
        _ => {
            let status = if rng.random_bool(0.9) {
                "active"
            } else {
                "inactive"
            };
            client.execute(SET_STATUS, &[&status, &id]).await.map(drop)
        }
    };
    if result.is_err() {
        let _ = client.batch_execute("ROLLBACK").await;
    }
    result.is_ok()
}
