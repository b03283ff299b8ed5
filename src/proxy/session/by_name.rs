//! A session's prepared statements or portals, by name. The unnamed one (`""`), which most
//! drivers use for every statement they do not prepare, has a slot of its own: no hashing
//! and no allocation on the path every unprepared statement takes. The named entry found
//! last is found again without hashing: a Bind looks its statement up a few times (is a
//! names question due, must it be read whole, where does it go), and an application that
//! runs one prepared statement in a loop binds the same one each time.

use std::{
    collections::HashMap,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
};

/// Named entries hashed with foldhash (seeded per process): names come from the client, so
/// not a fixed hasher; SipHash cost more than the rest of a Bind's handling.
type Map = HashMap<Box<[u8]>, usize, foldhash::fast::RandomState>;

pub struct ByName<T> {
    unnamed: Option<T>,
    /// The named entries, in no particular order.
    entries: Vec<(Box<[u8]>, T)>,
    /// Where each named entry is in `entries`.
    index: Map,
    /// The position in `entries` of the named entry found or inserted last; checked against
    /// the name asked for before it is used (it may be stale after a removal). An atomic
    /// (relaxed: a plain load and store) only so that lookups stay `&self`.
    last: AtomicUsize,
}

impl<T> Default for ByName<T> {
    fn default() -> Self {
        Self {
            unnamed: None,
            entries: Vec::new(),
            index: Map::default(),
            last: AtomicUsize::new(0),
        }
    }
}

impl<T> ByName<T> {
    /// The position of the named entry `name` (not empty), if there is one.
    #[inline]
    fn position(&self, name: &[u8]) -> Option<usize> {
        let last = self.last.load(Relaxed);
        if self.entries.get(last).is_some_and(|(n, _)| **n == *name) {
            return Some(last);
        }
        let at = *self.index.get(name)?;
        self.last.store(at, Relaxed);
        Some(at)
    }

    pub fn get(&self, name: &[u8]) -> Option<&T> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.position(name).map(|at| &self.entries[at].1)
        }
    }

    pub fn get_mut(&mut self, name: &[u8]) -> Option<&mut T> {
        if name.is_empty() {
            self.unnamed.as_mut()
        } else {
            self.position(name).map(|at| &mut self.entries[at].1)
        }
    }

    pub fn insert(&mut self, name: &[u8], value: T) {
        if name.is_empty() {
            self.unnamed = Some(value);
            return;
        }
        match self.position(name) {
            Some(at) => self.entries[at].1 = value,
            None => {
                let at = self.entries.len();
                self.entries.push((name.into(), value));
                self.index.insert(name.into(), at);
                self.last.store(at, Relaxed);
            }
        }
    }

    pub fn remove(&mut self, name: &[u8]) {
        if name.is_empty() {
            self.unnamed = None;
            return;
        }
        let Some(at) = self.index.remove(name) else {
            return;
        };
        self.entries.swap_remove(at);
        // The last entry took the removed one's place.
        if let Some((moved, _)) = self.entries.get(at)
            && let Some(position) = self.index.get_mut(moved)
        {
            *position = at;
        }
    }

    pub fn clear(&mut self) {
        self.unnamed = None;
        self.entries.clear();
        self.index.clear();
    }

    /// Keeps the entries `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        if self.unnamed.as_ref().is_some_and(|v| !keep(v)) {
            self.unnamed = None;
        }
        let before = self.entries.len();
        self.entries.retain(|(_, v)| keep(v));
        if self.entries.len() != before {
            self.index.clear();
            for (at, (name, _)) in self.entries.iter().enumerate() {
                self.index.insert(name.clone(), at);
            }
        }
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.unnamed
            .iter_mut()
            .chain(self.entries.iter_mut().map(|(_, v)| v))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_unnamed_entry_and_named_ones_are_kept_apart() {
        let mut m = ByName::default();
        m.insert(b"", 1);
        m.insert(b"s1", 2);
        assert_eq!(m.get(b""), Some(&1));
        assert_eq!(m.get(b"s1"), Some(&2));
        m.insert(b"", 3);
        *m.get_mut(b"s1").unwrap() += 10;
        assert_eq!((m.get(b""), m.get(b"s1")), (Some(&3), Some(&12)));
        m.retain(|v| *v > 5);
        assert_eq!((m.get(b""), m.get(b"s1")), (None, Some(&12)));
        m.insert(b"", 4);
        assert_eq!(m.values_mut().map(|v| *v).sum::<i32>(), 16);
        m.remove(b"s1");
        m.remove(b"");
        assert_eq!((m.get(b""), m.get(b"s1")), (None, None));
        m.insert(b"x", 1);
        m.clear();
        assert_eq!(m.get(b"x"), None);
    }

    #[derive(Debug, Clone)]
    enum Op {
        Insert(u8, u32),
        Get(u8),
        GetMut(u8, u32),
        Remove(u8),
        Retain(u32),
        Clear,
    }

    /// A few names, the unnamed one among them ("" for 0), so that operations meet.
    fn name(n: u8) -> Vec<u8> {
        if n == 0 {
            Vec::new()
        } else {
            format!("s{n}").into_bytes()
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        let n = 0u8..6;
        prop_oneof![
            4 => (n.clone(), any::<u32>()).prop_map(|(n, v)| Op::Insert(n, v)),
            4 => n.clone().prop_map(Op::Get),
            2 => (n.clone(), any::<u32>()).prop_map(|(n, v)| Op::GetMut(n, v)),
            3 => n.prop_map(Op::Remove),
            1 => any::<u32>().prop_map(Op::Retain),
            1 => Just(Op::Clear),
        ]
    }

    proptest! {
        /// Any sequence of operations finds what a plain map would: the remembered position
        /// is never taken for another name's, whatever was removed or moved since.
        #[test]
        fn it_is_a_map(ops in proptest::collection::vec(op(), 0..60)) {
            let mut m = ByName::default();
            let mut model: HashMap<Vec<u8>, u32> = HashMap::new();
            for (i, op) in ops.into_iter().enumerate() {
                match op {
                    Op::Insert(n, v) => {
                        m.insert(&name(n), v);
                        model.insert(name(n), v);
                    }
                    Op::Get(n) => prop_assert_eq!(m.get(&name(n)), model.get(&name(n))),
                    Op::GetMut(n, v) => {
                        if let Some(x) = m.get_mut(&name(n)) {
                            *x = v;
                        }
                        if let Some(x) = model.get_mut(&name(n)) {
                            *x = v;
                        }
                    }
                    Op::Remove(n) => {
                        m.remove(&name(n));
                        model.remove(&name(n));
                    }
                    Op::Retain(bar) => {
                        m.retain(|v| *v % 3 != bar % 3);
                        model.retain(|_, v| *v % 3 != bar % 3);
                    }
                    Op::Clear => {
                        m.clear();
                        model.clear();
                    }
                }
                // Every name, ending on a different one each time (the one remembered next).
                for n in (0..6).map(|k| ((k + i) % 6) as u8) {
                    prop_assert_eq!(m.get(&name(n)), model.get(&name(n)), "name {}", n);
                }
                let mut values: Vec<u32> = m.values_mut().map(|v| *v).collect();
                let mut expected: Vec<u32> = model.values().copied().collect();
                values.sort_unstable();
                expected.sort_unstable();
                prop_assert_eq!(values, expected);
            }
        }
    }
}
