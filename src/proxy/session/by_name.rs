//! A session's prepared statements or portals, by name. The unnamed one (`""`), which most
//! drivers use for every statement they do not prepare, has a slot of its own: no hashing
//! and no allocation on the path every unprepared statement takes.

use std::collections::HashMap;

/// Named entries hashed with foldhash (seeded per process): names come from the client, so
/// not a fixed hasher; SipHash cost more than the rest of a Bind's handling.
type Map<T> = HashMap<Box<[u8]>, T, foldhash::fast::RandomState>;

pub struct ByName<T> {
    unnamed: Option<T>,
    named: Map<T>,
}

impl<T> Default for ByName<T> {
    fn default() -> Self {
        Self {
            unnamed: None,
            named: Map::default(),
        }
    }
}

impl<T> ByName<T> {
    pub fn get(&self, name: &[u8]) -> Option<&T> {
        if name.is_empty() {
            self.unnamed.as_ref()
        } else {
            self.named.get(name)
        }
    }

    pub fn get_mut(&mut self, name: &[u8]) -> Option<&mut T> {
        if name.is_empty() {
            self.unnamed.as_mut()
        } else {
            self.named.get_mut(name)
        }
    }

    pub fn insert(&mut self, name: &[u8], value: T) {
        if name.is_empty() {
            self.unnamed = Some(value);
        } else {
            self.named.insert(name.into(), value);
        }
    }

    pub fn remove(&mut self, name: &[u8]) {
        if name.is_empty() {
            self.unnamed = None;
        } else if !self.named.is_empty() {
            self.named.remove(name);
        }
    }

    pub fn clear(&mut self) {
        self.unnamed = None;
        self.named.clear();
    }

    /// Keeps the entries `keep` says yes to.
    pub fn retain(&mut self, mut keep: impl FnMut(&T) -> bool) {
        if self.unnamed.as_ref().is_some_and(|v| !keep(v)) {
            self.unnamed = None;
        }
        self.named.retain(|_, v| keep(v));
    }

    pub fn values_mut(&mut self) -> impl Iterator<Item = &mut T> {
        self.unnamed.iter_mut().chain(self.named.values_mut())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
}
