//! The legacy side for tests, the demo and the benchmarks: the `public.affiliates` table of
//! design.md and a deterministic generator of a seed-shaped affiliate tree.
//!
//! Shape (the seed's `TestDataGenerator`): the first 10% of ids are roots; every other
//! affiliate's parent is uniform among the ids before it. Registration dates grow with the
//! id (a child registers after its parent), money values are skewed like real ones (many
//! small accounts, a few large), statuses mostly active. Optional anomalies the migration
//! must survive: orphans (parent id that does not exist), one parent cycle, drifted
//! `level_1_referrals`. With `shuffle_ids` the ids are then given out in a random order (the
//! same tree, the same dates): about half of the children get a smaller id than their
//! parent, as ids imported from another system do. The same [`TreeSpec`] always yields the
//! same rows.
//!
//! Rows are streamed to the server with `COPY`, never held all at once.

use bytes::{BufMut, BytesMut};
use chrono::{NaiveDate, NaiveDateTime, TimeDelta};
use rand::rngs::ChaCha8Rng;
use rand::{RngExt, SeedableRng};
use tokio_postgres::Client;

use crate::migrate::copy_in::CopyIn;

/// DDL of the legacy table, exactly as design.md gives it.
pub const LEGACY_SCHEMA: &str = include_str!("../../fixtures/legacy_schema.sql");

/// What to generate.
#[derive(Debug, Clone)]
pub struct TreeSpec {
    pub affiliates: u64,
    pub seed: u64,
    /// Affiliates whose parent id points at no row.
    pub orphans: u64,
    /// Length of one parent cycle (0: none; otherwise at least 2).
    pub cycle_len: u64,
    /// Affiliates whose `level_1_referrals` is off from the true count of children.
    pub drifted_counters: u64,
    /// Ids independent of the tree's shape (a deterministic permutation), instead of every
    /// parent's id below its children's.
    pub shuffle_ids: bool,
}

impl TreeSpec {
    /// A clean tree of `affiliates` rows.
    pub fn clean(affiliates: u64) -> Self {
        Self {
            affiliates,
            seed: 42,
            orphans: 0,
            cycle_len: 0,
            drifted_counters: 0,
            shuffle_ids: false,
        }
    }
}

/// What was generated, anomalies included, for tests to assert against.
#[derive(Debug, Clone, Default)]
pub struct Generated {
    pub rows: u64,
    pub roots: u64,
    /// (affiliate, missing parent id)
    pub orphans: Vec<(i64, i64)>,
    /// The cycle's members, each the parent of the one before it.
    pub cycle: Vec<i64>,
    /// (affiliate, stored level_1_referrals, true count)
    pub drifted: Vec<(i64, i32, i32)>,
}

/// Creates the legacy table (if absent).
pub async fn create_legacy_table(client: &Client) -> Result<(), tokio_postgres::Error> {
    client.batch_execute(LEGACY_SCHEMA).await
}

/// Generates the tree into `public.affiliates` (which must exist and hold no clashing ids)
/// and moves its id sequence past the largest id.
pub async fn load(client: &Client, spec: &TreeSpec) -> Result<Generated, tokio_postgres::Error> {
    let tree = Tree::build(spec);
    let mut copy = CopyIn::start(
        client,
        "COPY public.affiliates (affiliate_id, parent_affiliate_id, external_id, name, email,
             status, registration_date, level_1_referrals, total_deposits, total_bets,
             total_withdrawals, total_cpa_earned, total_rev_earned, total_commissions_paid,
             created_at, updated_at) FROM STDIN",
    )
    .await?;
    let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0x5eed_a77e);
    // In the tree's order (registration order), whatever the ids.
    for node in 1..=spec.affiliates as i64 {
        tree.write_row(node, &mut rng, copy.rows());
        copy.flush_full().await?;
    }
    copy.finish().await?;

    client
        .batch_execute(
            "SELECT setval(pg_get_serial_sequence('public.affiliates', 'affiliate_id'),
                           GREATEST((SELECT max(affiliate_id) FROM public.affiliates), 1));
             ANALYZE public.affiliates",
        )
        .await?;
    Ok(tree.generated)
}

/// The tree's structure: parents and counters, decided before any row is written. Indexed
/// by node (1..=n, in registration order; [0] unused); `ids` gives each node's id.
struct Tree {
    parent: Vec<Option<i64>>,
    /// Node → id: the identity, or a permutation with `shuffle_ids`.
    ids: Vec<i64>,
    stored_referrals: Vec<i32>,
    generated: Generated,
    start: NaiveDateTime,
    span_seconds: i64,
}

const FIRST_NAMES: &[&str] = &[
    "Ana", "Bruno", "Carla", "Diego", "Eduarda", "Felipe", "Gabriela", "Henrique", "Isabela",
    "João", "Larissa", "Marcos", "Natália", "Otávio", "Paula", "Rafael", "Sofia", "Thiago",
    "Vanessa", "William",
];
const LAST_NAMES: &[&str] = &[
    "Silva",
    "Santos",
    "Oliveira",
    "Souza",
    "Rodrigues",
    "Ferreira",
    "Alves",
    "Pereira",
    "Lima",
    "Gomes",
    "Costa",
    "Ribeiro",
    "Martins",
    "Carvalho",
    "Almeida",
    "Lopes",
];

impl Tree {
    fn build(spec: &TreeSpec) -> Self {
        let n = spec.affiliates as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let roots = (n / 10).max(n.min(1));
        let mut parent: Vec<Option<i64>> = vec![None; n + 1];
        for (id, slot) in parent.iter_mut().enumerate().skip(roots + 1) {
            *slot = Some(rng.random_range(1..id as i64));
        }

        // Anomalies land on distinct non-root affiliates.
        let mut picked = std::collections::HashSet::new();
        let mut pick = |rng: &mut ChaCha8Rng| -> Option<i64> {
            if n <= roots + picked.len() {
                return None;
            }
            loop {
                let id = rng.random_range((roots as i64 + 1)..=(n as i64));
                if picked.insert(id) {
                    return Some(id);
                }
            }
        };
        let mut generated = Generated {
            rows: n as u64,
            roots: roots as u64,
            ..Generated::default()
        };
        for k in 0..spec.orphans {
            let Some(id) = pick(&mut rng) else { break };
            let missing = n as i64 + 1_000_000 + k as i64;
            parent[id as usize] = Some(missing);
            generated.orphans.push((id, missing));
        }
        if spec.cycle_len >= 2 {
            let members: Vec<i64> = (0..spec.cycle_len).filter_map(|_| pick(&mut rng)).collect();
            for (i, &id) in members.iter().enumerate() {
                parent[id as usize] = Some(members[(i + 1) % members.len()]);
            }
            generated.cycle = members;
        }

        let mut truth = vec![0i32; n + 1];
        for p in parent.iter().flatten() {
            if let Some(count) = truth.get_mut(*p as usize) {
                *count += 1;
            }
        }
        let mut stored_referrals = truth.clone();
        for _ in 0..spec.drifted_counters {
            let Some(id) = pick(&mut rng) else { break };
            let real = truth[id as usize];
            let drift = [-2, -1, 1, 2, 5][rng.random_range(0..5)];
            let stored = if real + drift < 0 {
                real + 1
            } else {
                real + drift
            };
            stored_referrals[id as usize] = stored;
            generated.drifted.push((id, stored, real));
        }

        let mut ids: Vec<i64> = (0..=n as i64).collect();
        if spec.shuffle_ids {
            // Its own random stream: the tree is the same as without the shuffle.
            let mut rng = ChaCha8Rng::seed_from_u64(spec.seed ^ 0x1d5_5b0f);
            for i in (2..=n).rev() {
                let j = rng.random_range(1..=i);
                ids.swap(i, j);
            }
            let id = |node: i64| ids[node as usize];
            for (node, _) in &mut generated.orphans {
                *node = id(*node);
            }
            for node in &mut generated.cycle {
                *node = id(*node);
            }
            for (node, _, _) in &mut generated.drifted {
                *node = id(*node);
            }
        }

        Self {
            parent,
            ids,
            stored_referrals,
            generated,
            start: NaiveDate::from_ymd_opt(2022, 1, 1)
                .and_then(|d| d.and_hms_opt(8, 0, 0))
                .expect("a valid constant date"),
            span_seconds: 3 * 365 * 86_400,
        }
    }

    /// Node `node`'s row in COPY text format.
    fn write_row(&self, node: i64, rng: &mut ChaCha8Rng, out: &mut BytesMut) {
        let n = self.parent.len() as i64 - 1;
        let id = self.ids[node as usize];
        let first = FIRST_NAMES[rng.random_range(0..FIRST_NAMES.len())];
        let last = LAST_NAMES[rng.random_range(0..LAST_NAMES.len())];
        let status = match rng.random_range(0..100) {
            0..85 => "active",
            85..93 => "inactive",
            93..98 => "suspended",
            _ => "banned",
        };
        // Dates grow with the node (a child registers after its parent); a jitter of up to
        // an hour keeps them from being uniform.
        let at = self.start
            + TimeDelta::seconds(self.span_seconds * node / n.max(1) + rng.random_range(0..3600));
        let updated = at + TimeDelta::seconds(rng.random_range(0..90 * 86_400));

        // Money in cents: 30% never deposited; the rest log-uniform from R$10 to R$100k.
        let deposits: i64 = if rng.random_range(0..10) < 3 {
            0
        } else {
            (1000.0 * 10f64.powf(rng.random::<f64>() * 4.0)) as i64
        };
        let bets = deposits * rng.random_range(100..600) / 100;
        let withdrawals = deposits * rng.random_range(0..90) / 100;
        let cpa = if deposits > 0 && rng.random_range(0..4) == 0 {
            [5000, 10000, 15000][rng.random_range(0..3)]
        } else {
            0
        };
        let rev = bets * rng.random_range(0..5) / 100;
        let paid = (cpa + rev) * rng.random_range(0..=100) / 100;

        let mut line = String::with_capacity(256);
        use std::fmt::Write;
        let parent = match self.parent[node as usize] {
            // A parent that is a node gets its id; an orphan's missing parent stays missing.
            Some(p) if (1..=n).contains(&p) => self.ids[p as usize].to_string(),
            Some(p) => p.to_string(),
            None => "\\N".to_owned(),
        };
        let email = if rng.random_range(0..10) == 0 {
            "\\N".to_owned()
        } else {
            format!(
                "{}.{}.{id}@example.com",
                ascii_lower(first),
                ascii_lower(last)
            )
        };
        // Infallible: writing to a String.
        let _ = writeln!(
            line,
            "{id}\t{parent}\taff-{id:08}\t{first} {last}\t{email}\t{status}\t{at}\t{refs}\t{}\t{}\t{}\t{}\t{}\t{}\t{at}\t{updated}",
            money(deposits),
            money(bets),
            money(withdrawals),
            money(cpa),
            money(rev),
            money(paid),
            refs = self.stored_referrals[node as usize],
            at = at.format("%Y-%m-%d %H:%M:%S"),
            updated = updated.format("%Y-%m-%d %H:%M:%S"),
        );
        out.put_slice(line.as_bytes());
    }
}

fn money(cents: i64) -> String {
    format!("{}.{:02}", cents / 100, cents % 100)
}

/// Lower-case ASCII with the accents of the name lists dropped, for e-mail addresses.
fn ascii_lower(name: &str) -> String {
    name.chars()
        .map(|c| match c {
            'á' | 'ã' | 'â' => 'a',
            'é' | 'ê' => 'e',
            'í' => 'i',
            'ó' | 'ô' | 'õ' => 'o',
            'ú' => 'u',
            'ç' => 'c',
            other => other.to_ascii_lowercase(),
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shuffled_ids_keep_the_tree_and_break_the_order() {
        let spec = TreeSpec {
            orphans: 3,
            cycle_len: 3,
            drifted_counters: 4,
            ..TreeSpec::clean(20_000)
        };
        let plain = Tree::build(&spec);
        let shuffled = Tree::build(&TreeSpec {
            shuffle_ids: true,
            ..spec
        });
        assert_eq!(plain.parent, shuffled.parent, "the same tree");
        let mut ids = shuffled.ids[1..].to_vec();
        ids.sort_unstable();
        assert_eq!(ids, (1..=20_000).collect::<Vec<i64>>(), "a permutation");
        let (mut below, mut children) = (0, 0);
        for (node, parent) in shuffled.parent.iter().enumerate().skip(1) {
            if let Some(p) = parent.filter(|p| (1..=20_000).contains(p)) {
                children += 1;
                below += i32::from(shuffled.ids[node] < shuffled.ids[p as usize]);
            }
        }
        let share = f64::from(below) / f64::from(children);
        assert!((0.4..0.6).contains(&share), "{share}");
        // The anomalies name the rows' ids.
        let orphan = shuffled.generated.orphans[0].0;
        let node = shuffled.ids.iter().position(|&id| id == orphan).unwrap();
        assert_eq!(plain.generated.orphans[0].0, node as i64);
    }

    #[test]
    fn same_spec_same_tree() {
        let spec = TreeSpec {
            affiliates: 1000,
            seed: 7,
            orphans: 3,
            cycle_len: 3,
            drifted_counters: 5,
            shuffle_ids: false,
        };
        let (a, b) = (Tree::build(&spec), Tree::build(&spec));
        assert_eq!(a.parent, b.parent);
        assert_eq!(a.stored_referrals, b.stored_referrals);
        let (mut ra, mut rb) = (BytesMut::new(), BytesMut::new());
        let mut rng_a = ChaCha8Rng::seed_from_u64(1);
        let mut rng_b = ChaCha8Rng::seed_from_u64(1);
        a.write_row(500, &mut rng_a, &mut ra);
        b.write_row(500, &mut rng_b, &mut rb);
        assert_eq!(ra, rb);
    }

    #[test]
    fn shape_follows_the_seed() {
        let tree = Tree::build(&TreeSpec::clean(10_000));
        assert_eq!(tree.generated.roots, 1000);
        for id in 1..=1000 {
            assert_eq!(tree.parent[id], None);
        }
        for id in 1001..=10_000 {
            let p = tree.parent[id].expect("non-root has a parent");
            assert!(p >= 1 && p < id as i64, "parent {p} of {id} is earlier");
        }
    }

    #[test]
    fn anomalies_are_what_they_say() {
        let spec = TreeSpec {
            affiliates: 2000,
            seed: 3,
            orphans: 4,
            cycle_len: 3,
            drifted_counters: 6,
            shuffle_ids: false,
        };
        let tree = Tree::build(&spec);
        let g = &tree.generated;
        assert_eq!(g.orphans.len(), 4);
        for (id, missing) in &g.orphans {
            assert_eq!(tree.parent[*id as usize], Some(*missing));
            assert!(*missing > 2000);
        }
        assert_eq!(g.cycle.len(), 3);
        // Following parents from a member comes back to it in cycle_len steps.
        let start = g.cycle[0];
        let mut at = start;
        for _ in 0..3 {
            at = tree.parent[at as usize].unwrap();
        }
        assert_eq!(at, start);
        assert_eq!(g.drifted.len(), 6);
        for (id, stored, real) in &g.drifted {
            assert_ne!(stored, real);
            assert!(*stored >= 0);
            assert_eq!(tree.stored_referrals[*id as usize], *stored);
        }
    }
}
