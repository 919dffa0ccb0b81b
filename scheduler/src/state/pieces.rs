//! A small growable bitset of finished piece numbers.

/// The pieces a peer reported as finished.
///
/// The caller bounds piece numbers (by the task's piece count, or by
/// [`wire::piece::MAX_PIECE_COUNT`] while the size is unknown), so the set never grows past
/// 128 KiB however a peer behaves.
#[derive(Debug, Clone, Default)]
pub(crate) struct PieceSet {
    words: Vec<u64>,
    count: u32,
}

impl PieceSet {
    /// Adds piece `number`; returns false if it was already there.
    pub(crate) fn insert(&mut self, number: u32) -> bool {
        let (word, bit) = Self::position(number);
        if self.words.len() <= word {
            self.words.resize(word + 1, 0);
        }
        let mask = 1u64 << bit;
        // `word` is in bounds: the vector was just grown to cover it.
        let Some(slot) = self.words.get_mut(word) else {
            return false;
        };
        if *slot & mask != 0 {
            return false;
        }
        *slot |= mask;
        self.count += 1;
        true
    }

    /// Whether piece `number` is in the set.
    pub(crate) fn contains(&self, number: u32) -> bool {
        let (word, bit) = Self::position(number);
        self.words.get(word).is_some_and(|w| w & (1u64 << bit) != 0)
    }

    /// Number of pieces in the set.
    pub(crate) fn count(&self) -> u32 {
        self.count
    }

    /// Drops every piece numbered `len` or more (used once the task's piece count is known).
    pub(crate) fn truncate(&mut self, len: u32) {
        let (word, bit) = Self::position(len);
        self.words.truncate(word + 1);
        if let Some(last) = self.words.get_mut(word) {
            *last &= (1u64 << bit) - 1;
        }
        self.count = self.words.iter().map(|w| w.count_ones()).sum();
    }

    fn position(number: u32) -> (usize, u32) {
        ((number / 64) as usize, number % 64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn insert_count_truncate() {
        let mut s = PieceSet::default();
        assert!(s.insert(0));
        assert!(!s.insert(0));
        assert!(s.insert(63));
        assert!(s.insert(64));
        assert!(s.insert(200));
        assert_eq!(s.count(), 4);
        assert!(s.contains(64) && !s.contains(65));
        s.truncate(64);
        assert_eq!(s.count(), 2);
        assert!(s.contains(63) && !s.contains(64) && !s.contains(200));
        s.truncate(0);
        assert_eq!(s.count(), 0);
    }
}
