//! A set with O(1) insert, remove and uniform random sampling.

use std::hash::Hash;

use rand::Rng;

/// Members in a vector (for sampling by index) plus their positions (for O(1) removal).
#[derive(Debug, Clone)]
pub(crate) struct KeySet<K> {
    items: Vec<K>,
    index: std::collections::HashMap<K, usize, foldhash::fast::RandomState>,
}

impl<K> Default for KeySet<K> {
    fn default() -> Self {
        Self {
            items: Vec::new(),
            index: Default::default(),
        }
    }
}

impl<K: Copy + Eq + Hash> KeySet<K> {
    /// Adds `k`; returns false if it was there.
    pub(crate) fn insert(&mut self, k: K) -> bool {
        if self.index.contains_key(&k) {
            return false;
        }
        self.index.insert(k, self.items.len());
        self.items.push(k);
        true
    }

    /// Removes `k`; returns false if it was absent.
    pub(crate) fn remove(&mut self, k: &K) -> bool {
        let Some(i) = self.index.remove(k) else {
            return false;
        };
        self.items.swap_remove(i);
        if let Some(moved) = self.items.get(i) {
            self.index.insert(*moved, i);
        }
        true
    }

    /// Whether `k` is a member.
    pub(crate) fn contains(&self, k: &K) -> bool {
        self.index.contains_key(k)
    }

    /// Number of members.
    pub(crate) fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the set is empty.
    pub(crate) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Members in storage order (insertion order, disturbed by removals).
    pub(crate) fn iter(&self) -> impl Iterator<Item = &K> {
        self.items.iter()
    }

    /// Up to `n` distinct members chosen uniformly at random (all of them, shuffled, when the
    /// set is small).
    pub(crate) fn sample(&self, n: usize, rng: &mut impl Rng) -> Vec<K> {
        let len = self.items.len();
        if len <= n {
            let mut all = self.items.clone();
            for i in (1..all.len()).rev() {
                let j = rng.random_range(0..=i);
                all.swap(i, j);
            }
            return all;
        }
        let mut out: Vec<K> = Vec::with_capacity(n);
        // n is small next to len here, so rejection of repeats is cheap.
        let mut tries = 0;
        while out.len() < n && tries < n * 8 {
            tries += 1;
            let Some(k) = self.items.get(rng.random_range(0..len)) else {
                continue;
            };
            if !out.contains(k) {
                out.push(*k);
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng as _;

    #[test]
    fn insert_remove_sample() {
        let mut s = KeySet::default();
        for i in 0..10u32 {
            assert!(s.insert(i));
        }
        assert!(!s.insert(3));
        assert!(s.remove(&3));
        assert!(!s.remove(&3));
        assert!(!s.contains(&3) && s.contains(&9));
        assert_eq!(s.len(), 9);
        let mut rng = rand::rngs::SmallRng::seed_from_u64(1);
        let few = s.sample(4, &mut rng);
        assert_eq!(few.len(), 4);
        assert!(few.iter().all(|k| s.contains(k)));
        let mut all = s.sample(100, &mut rng);
        all.sort_unstable();
        assert_eq!(all, vec![0, 1, 2, 4, 5, 6, 7, 8, 9]);
        for i in 0..10 {
            s.remove(&i);
        }
        assert!(s.is_empty());
    }
}
