//! The backfill's walk of the legacy tree, in memory: from the parent links alone, each
//! reachable affiliate's level, path and counters, and the affiliates no root reaches. Pure
//! (no I/O): the backfill reads the links out of legacy and writes the walk back with `COPY`.
//!
//! Done here rather than as a recursive query: the query scanned every link again at each of
//! the tree's levels and counted descendants by splitting a million path strings (11 s of a
//! million-affiliate backfill); the walk here is linear and takes well under a second.

use std::{collections::HashMap, fmt::Write};

use bytes::BytesMut;
use foldhash::fast::FixedState;

/// The tree of a set of parent links.
#[derive(Debug)]
pub struct Walk {
    ids: Vec<i64>,
    parents: Vec<Option<usize>>,
    /// Reachable nodes, roots first, each after its parent (breadth first).
    order: Vec<usize>,
    level: Vec<i32>,
    direct: Vec<i32>,
    network: Vec<i32>,
    /// (id, its parent's id) of every node no root reaches, in the links' order.
    unreachable: Vec<(i64, Option<i64>)>,
}

/// A reachable affiliate, as the plan records it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Placed {
    pub id: i64,
    pub parent: Option<i64>,
    /// 1 for a root.
    pub level: i32,
    /// Its children.
    pub direct: i32,
    /// Its descendants, at any depth.
    pub network: i32,
}

impl Walk {
    /// Walks the tree of `links` (id, parent id; ids unique). A root has no parent; a node
    /// whose parent does not exist, or that is on (or under) a cycle, is unreachable.
    pub fn new(links: &[(i64, Option<i64>)]) -> Self {
        let index: HashMap<i64, usize, FixedState> = links
            .iter()
            .enumerate()
            .map(|(i, (id, _))| (*id, i))
            .collect();
        let n = links.len();
        let ids: Vec<i64> = links.iter().map(|(id, _)| *id).collect();
        let parents: Vec<Option<usize>> = links
            .iter()
            .map(|(_, p)| p.and_then(|p| index.get(&p).copied()))
            .collect();
        // Children in one flat array, each node's between two offsets.
        let mut start = vec![0usize; n + 1];
        for p in parents.iter().flatten() {
            start[p + 1] += 1;
        }
        for i in 0..n {
            start[i + 1] += start[i];
        }
        let mut next = start.clone();
        let mut children = vec![0usize; start[n]];
        for (child, p) in parents.iter().enumerate() {
            if let Some(p) = p {
                children[next[*p]] = child;
                next[*p] += 1;
            }
        }
        let mut level = vec![0i32; n];
        let mut order: Vec<usize> = (0..n).filter(|&i| links[i].1.is_none()).collect();
        for &root in &order {
            level[root] = 1;
        }
        let mut at = 0;
        while at < order.len() {
            let node = order[at];
            for &child in &children[start[node]..start[node + 1]] {
                level[child] = level[node] + 1;
                order.push(child);
            }
            at += 1;
        }
        let mut direct = vec![0i32; n];
        let mut network = vec![0i32; n];
        // Leaves first: each node adds itself and its descendants to its parent.
        for &node in order.iter().rev() {
            if let Some(p) = parents[node] {
                direct[p] += 1;
                network[p] += network[node] + 1;
            }
        }
        let unreachable = (0..n)
            .filter(|&i| level[i] == 0)
            .map(|i| links[i])
            .collect();
        Self {
            ids,
            parents,
            order,
            level,
            direct,
            network,
            unreachable,
        }
    }

    /// The reachable affiliates, roots first, each after its parent.
    pub fn placed(&self) -> impl Iterator<Item = Placed> + '_ {
        self.order.iter().map(|&node| Placed {
            id: self.ids[node],
            parent: self.parents[node].map(|p| self.ids[p]),
            level: self.level[node],
            direct: self.direct[node],
            network: self.network[node],
        })
    }

    /// The affiliates no root reaches: (id, parent id).
    pub fn unreachable(&self) -> &[(i64, Option<i64>)] {
        &self.unreachable
    }

    /// The reachable affiliates as `COPY … FROM STDIN` text rows, roots first, each after its
    /// parent: id, parent (`\N` for a root), level, path (the ids from the root down,
    /// dot-separated, as an ltree), children, descendants.
    pub fn copy_rows(&self) -> CopyRows<'_> {
        CopyRows {
            walk: self,
            at: 0,
            up: Vec::new(),
        }
    }
}

/// The rows of [`Walk::copy_rows`], written one at a time.
pub struct CopyRows<'w> {
    walk: &'w Walk,
    at: usize,
    /// The path of the row being written, from it up to its root.
    up: Vec<i64>,
}

impl CopyRows<'_> {
    /// Writes the next row into `out`; false when all are written.
    pub fn write_next(&mut self, out: &mut BytesMut) -> bool {
        let walk = self.walk;
        let Some(&node) = walk.order.get(self.at) else {
            return false;
        };
        self.at += 1;
        self.up.clear();
        let mut on = Some(node);
        while let Some(n) = on {
            self.up.push(walk.ids[n]);
            on = walk.parents[n];
        }
        // Writing into a BytesMut cannot fail.
        let _ = write!(out, "{}\t", walk.ids[node]);
        match walk.parents[node] {
            Some(p) => {
                let _ = write!(out, "{}\t", walk.ids[p]);
            }
            None => out.extend_from_slice(b"\\N\t"),
        }
        let _ = write!(out, "{}\t", walk.level[node]);
        for (i, id) in self.up.iter().rev().enumerate() {
            if i > 0 {
                out.extend_from_slice(b".");
            }
            let _ = write!(out, "{id}");
        }
        let _ = writeln!(out, "\t{}\t{}", walk.direct[node], walk.network[node]);
        true
    }
}

/// The closure pairs of affiliates given with their paths: for each, one `COPY` text row per
/// proper ancestor (ancestor, descendant, distance). `path` is the ltree's text, the ids from
/// the root down, the affiliate's own last.
pub fn write_closure_rows(out: &mut BytesMut, id: i64, path: &str) {
    let labels: Vec<&str> = path.split('.').collect();
    let own = labels.len();
    for (i, ancestor) in labels[..own.saturating_sub(1)].iter().enumerate() {
        // Writing into a BytesMut cannot fail.
        let _ = writeln!(out, "{ancestor}\t{id}\t{}", own - i - 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn placed(links: &[(i64, Option<i64>)]) -> Vec<Placed> {
        let mut p: Vec<Placed> = Walk::new(links).placed().collect();
        p.sort_by_key(|p| p.id);
        p
    }

    #[test]
    fn a_small_tree_with_an_orphan_and_a_cycle() {
        // 1 ─ 2 ─ 4
        //   └ 3
        // 5 → 99 (missing); 6 ↔ 7; 8 under the cycle
        let links = [
            (4, Some(2)),
            (1, None),
            (2, Some(1)),
            (3, Some(1)),
            (5, Some(99)),
            (6, Some(7)),
            (7, Some(6)),
            (8, Some(7)),
        ];
        let walk = Walk::new(&links);
        let p = |id, parent, level, direct, network| Placed {
            id,
            parent,
            level,
            direct,
            network,
        };
        assert_eq!(
            placed(&links),
            vec![
                p(1, None, 1, 2, 3),
                p(2, Some(1), 2, 1, 1),
                p(3, Some(1), 2, 0, 0),
                p(4, Some(2), 3, 0, 0),
            ]
        );
        assert_eq!(
            walk.unreachable(),
            &[(5, Some(99)), (6, Some(7)), (7, Some(6)), (8, Some(7))]
        );
        let mut out = BytesMut::new();
        let mut rows = walk.copy_rows();
        while rows.write_next(&mut out) {}
        assert_eq!(
            String::from_utf8(out.to_vec()).unwrap(),
            "1\t\\N\t1\t1\t2\t3\n2\t1\t2\t1.2\t1\t1\n3\t1\t2\t1.3\t0\t0\n4\t2\t3\t1.2.4\t0\t0\n"
        );
        let mut pairs = BytesMut::new();
        write_closure_rows(&mut pairs, 4, "1.2.4");
        write_closure_rows(&mut pairs, 1, "1");
        assert_eq!(
            String::from_utf8(pairs.to_vec()).unwrap(),
            "1\t4\t2\n2\t4\t1\n"
        );
    }

    /// Links of a random forest, with some parents pointing at missing ids or at each other.
    fn links() -> impl Strategy<Value = Vec<(i64, Option<i64>)>> {
        (1usize..60).prop_flat_map(|n| {
            (
                proptest::collection::vec((0usize..n + 3, 0u8..10), n),
                Just(n),
                any::<u64>(),
            )
                .prop_map(|(parents, n, salt)| {
                    // Ids unrelated to the shape: a multiplicative shuffle of 1..=n.
                    let id = |i: usize| ((i as u64 * 7919 + salt % 97) % 1_000_003) as i64 + 1;
                    parents
                        .into_iter()
                        .enumerate()
                        .map(|(i, (p, kind))| {
                            let parent = match kind {
                                0..=1 => None,
                                2 => Some(-5), // missing
                                _ if p < n => Some(id(p)),
                                _ => None,
                            };
                            (id(i), parent)
                        })
                        .collect()
                })
        })
    }

    /// The model: follow each node's parents; it is reachable when a root ends the chain.
    fn model(links: &[(i64, Option<i64>)]) -> (Vec<Placed>, Vec<i64>) {
        let parent: HashMap<i64, Option<i64>> = links.iter().copied().collect();
        let chain = |id: i64| -> Option<Vec<i64>> {
            let mut up = vec![id];
            let mut at = id;
            loop {
                match parent.get(&at)? {
                    None => return Some(up),
                    Some(p) => {
                        if up.contains(p) {
                            return None;
                        }
                        up.push(*p);
                        at = *p;
                    }
                }
            }
        };
        let mut placed = Vec::new();
        let mut unreachable = Vec::new();
        for &(id, p) in links {
            match chain(id) {
                None => unreachable.push(id),
                Some(up) => {
                    let reachable_below = |of: i64| {
                        links
                            .iter()
                            .filter(|(c, _)| *c != of)
                            .filter(|(c, _)| chain(*c).is_some_and(|u| u.contains(&of)))
                            .count() as i32
                    };
                    placed.push(Placed {
                        id,
                        parent: p,
                        level: up.len() as i32,
                        direct: links.iter().filter(|(_, q)| *q == Some(id)).count() as i32,
                        network: reachable_below(id),
                    })
                }
            }
        }
        placed.sort_by_key(|p| p.id);
        (placed, unreachable)
    }

    proptest! {
        #[test]
        fn the_walk_agrees_with_following_each_nodes_parents(links in links()) {
            let ids: std::collections::HashSet<i64> = links.iter().map(|l| l.0).collect();
            prop_assume!(ids.len() == links.len());
            let walk = Walk::new(&links);
            let (placed_model, unreachable_model) = model(&links);
            prop_assert_eq!(placed(&links), placed_model);
            let unreachable: Vec<i64> = walk.unreachable().iter().map(|u| u.0).collect();
            prop_assert_eq!(unreachable, unreachable_model);
            // Each node after its parent; every path is the chain of ids down to it.
            let mut seen = std::collections::HashSet::new();
            for p in walk.placed() {
                prop_assert!(p.parent.is_none_or(|q| seen.contains(&q)));
                seen.insert(p.id);
            }
            // One row per reachable affiliate.
            let mut out = BytesMut::new();
            let mut rows = walk.copy_rows();
            let mut written = 0;
            while rows.write_next(&mut out) {
                written += 1;
            }
            prop_assert_eq!(written, walk.placed().count());
            prop_assert_eq!(out.iter().filter(|b| **b == b'\n').count(), written);
        }
    }
}
