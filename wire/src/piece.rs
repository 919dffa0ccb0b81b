//! Piece math: how a task's content is cut into pieces.
//!
//! The rule has Dragonfly's shape with finer pieces: piece length is the next power of two of
//! `content_length / 1024` (Dragonfly: `/ 500`), clamped to `[min, max]`, and Damselfly's
//! default minimum is 128 KiB instead of Dragonfly's 4 MiB. Bursts finish closer to the lower
//! bound with more pieces: store and forward delays every hop by one piece time (see
//! DESIGN.md, "Piece granularity has a price"). Measured with `loadgen simulate` (10,000 peers,
//! 1 GiB, 100 Mbit hosts): 4 MiB pieces finish at 1.26 T*, 2 MiB at 1.15, 1 MiB at 1.12
//! (tuning.md, "Piece length and the ramp-up"). In the burst lab with every link at 100 Mbit
//! (64 MiB, 20 hosts) 1 MiB pieces took 1.56 / 1.61 × T* (p50 / max), 256 KiB 1.34 / 1.37 and
//! 128 KiB 1.17 / 1.20; with a 1 Gbit seed 1.18 / 1.27 against 1.09 / 1.13 (tuning.md,
//! "Scarce seed"): the minimum went from 1 MiB to 128 KiB on 2026-12-06. Files of 128 MiB and
//! more keep about 1,024 pieces.

use std::ops::Range;

/// Default smallest piece length (128 KiB).
pub const DEFAULT_MIN_PIECE_LENGTH: u64 = 128 << 10;
/// Default largest piece length (64 MiB), also the hard upper bound of the wire protocol.
pub const MAX_PIECE_LENGTH: u64 = 64 << 20;
/// Smallest piece length accepted anywhere (16 KiB): below it bookkeeping dominates.
pub const MIN_PIECE_LENGTH: u64 = 16 << 10;
/// Largest number of pieces a task may have (the bitmap frame is bounded by it).
pub const MAX_PIECE_COUNT: u64 = 1 << 20;
/// Target number of pieces used by the length rule (a power of two, so that power-of-two
/// sizes such as 1 GiB land exactly on 1 MiB pieces).
const TARGET_PIECES: u64 = 1024;

/// Picks a piece length for `content_length` bytes (the next power of two of
/// `content_length / 1024`), clamped to
/// `[min, max]` (both are themselves clamped to the protocol's bounds), and raised if needed
/// so that the piece count stays within [`MAX_PIECE_COUNT`].
pub fn piece_length_for(content_length: u64, min: u64, max: u64) -> u64 {
    let min = min
        .clamp(MIN_PIECE_LENGTH, MAX_PIECE_LENGTH)
        .next_power_of_two();
    let max = max.clamp(min, MAX_PIECE_LENGTH);
    let ideal = (content_length / TARGET_PIECES).max(1).next_power_of_two();
    let mut len = ideal.clamp(min, max);
    while content_length.div_ceil(len) > MAX_PIECE_COUNT && len < MAX_PIECE_LENGTH {
        len *= 2;
    }
    len
}

/// Error for a task whose size cannot be cut into pieces under the protocol's limits.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// The piece length is outside `[MIN_PIECE_LENGTH, MAX_PIECE_LENGTH]`.
    #[error("piece length {0} is outside {MIN_PIECE_LENGTH}..={MAX_PIECE_LENGTH}")]
    PieceLength(u64),
    /// The content would need more than [`MAX_PIECE_COUNT`] pieces.
    #[error(
        "{content_length} bytes in pieces of {piece_length} would exceed {MAX_PIECE_COUNT} pieces"
    )]
    TooManyPieces {
        /// Content length of the task.
        content_length: u64,
        /// Piece length asked for.
        piece_length: u64,
    },
}

/// The piece layout of one task: content length and piece length, and what follows from them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PieceLayout {
    content_length: u64,
    piece_length: u64,
}

impl PieceLayout {
    /// A layout, checked against the protocol's limits.
    pub fn new(content_length: u64, piece_length: u64) -> Result<Self, LayoutError> {
        if !(MIN_PIECE_LENGTH..=MAX_PIECE_LENGTH).contains(&piece_length) {
            return Err(LayoutError::PieceLength(piece_length));
        }
        if content_length.div_ceil(piece_length) > MAX_PIECE_COUNT {
            return Err(LayoutError::TooManyPieces {
                content_length,
                piece_length,
            });
        }
        Ok(Self {
            content_length,
            piece_length,
        })
    }

    /// Total bytes of the task.
    pub fn content_length(&self) -> u64 {
        self.content_length
    }

    /// Bytes of every piece but possibly the last.
    pub fn piece_length(&self) -> u64 {
        self.piece_length
    }

    /// Number of pieces (0 for empty content).
    pub fn piece_count(&self) -> u32 {
        // Bounded by MAX_PIECE_COUNT (checked in `new`), so it fits in u32.
        self.content_length.div_ceil(self.piece_length) as u32
    }

    /// Byte range of piece `number`, or `None` past the last piece.
    pub fn piece_range(&self, number: u32) -> Option<Range<u64>> {
        if number >= self.piece_count() {
            return None;
        }
        let start = u64::from(number) * self.piece_length;
        let end = (start + self.piece_length).min(self.content_length);
        Some(start..end)
    }

    /// Length of piece `number`, or `None` past the last piece.
    pub fn piece_size(&self, number: u32) -> Option<u64> {
        self.piece_range(number).map(|r| r.end - r.start)
    }

    /// The piece holding byte `offset`, or `None` past the end.
    pub fn piece_at(&self, offset: u64) -> Option<u32> {
        (offset < self.content_length).then(|| (offset / self.piece_length) as u32)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn length_rule_targets_about_a_thousand_pieces_with_clamps() {
        let mib = 1u64 << 20;
        // 256 MiB / 1024 = 256 KiB.
        assert_eq!(
            piece_length_for(256 * mib, DEFAULT_MIN_PIECE_LENGTH, MAX_PIECE_LENGTH),
            256 << 10
        );
        // 64 MiB / 1024 = 64 KiB -> 128 KiB (our default min).
        assert_eq!(
            piece_length_for(64 * mib, DEFAULT_MIN_PIECE_LENGTH, MAX_PIECE_LENGTH),
            128 << 10
        );
        // With the old 1 MiB minimum.
        assert_eq!(piece_length_for(256 * mib, mib, MAX_PIECE_LENGTH), mib);
        // With Dragonfly's 4 MiB minimum.
        assert_eq!(
            piece_length_for(256 * mib, 4 * mib, MAX_PIECE_LENGTH),
            4 * mib
        );
        // 1 GiB / 1024 = 1 MiB exactly: 1,024 pieces.
        assert_eq!(
            piece_length_for(1 << 30, DEFAULT_MIN_PIECE_LENGTH, MAX_PIECE_LENGTH),
            mib
        );
        // 1.5 GiB / 1024 = 1.5 MiB -> 2 MiB.
        assert_eq!(
            piece_length_for(3 << 29, DEFAULT_MIN_PIECE_LENGTH, MAX_PIECE_LENGTH),
            2 * mib
        );
        // 10 GiB / 1024 = 10 MiB -> 16 MiB.
        assert_eq!(
            piece_length_for(10 << 30, DEFAULT_MIN_PIECE_LENGTH, MAX_PIECE_LENGTH),
            16 * mib
        );
        // Huge files hit the maximum.
        assert_eq!(
            piece_length_for(1 << 40, DEFAULT_MIN_PIECE_LENGTH, MAX_PIECE_LENGTH),
            64 * mib
        );
        assert_eq!(
            piece_length_for(0, DEFAULT_MIN_PIECE_LENGTH, MAX_PIECE_LENGTH),
            128 << 10
        );
    }

    #[test]
    fn ranges_cover_content_exactly() {
        for (len, plen) in [
            (0u64, 16384u64),
            (1, 16384),
            (16384, 16384),
            (16385, 16384),
            (100_000, 32768),
        ] {
            let l = PieceLayout::new(len, plen).expect("valid layout");
            let mut next = 0;
            for n in 0..l.piece_count() {
                let r = l.piece_range(n).expect("piece in range");
                assert_eq!(r.start, next);
                assert!(r.end > r.start);
                assert_eq!(l.piece_at(r.start), Some(n));
                next = r.end;
            }
            assert_eq!(next, len);
            assert_eq!(l.piece_range(l.piece_count()), None);
            assert_eq!(l.piece_at(len), None);
        }
    }

    #[test]
    fn rejects_bad_layouts() {
        assert!(PieceLayout::new(10, 0).is_err());
        assert!(PieceLayout::new(10, MAX_PIECE_LENGTH + 1).is_err());
        assert!(PieceLayout::new(u64::MAX, MIN_PIECE_LENGTH).is_err());
    }
}
