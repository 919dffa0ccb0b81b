//! Replaying the fuzz targets' seed corpora (`fuzz/seeds/<target>/`) as ordinary tests.
//!
//! The fuzz crate (libFuzzer, `cargo fuzz`) is not part of the workspace, so each crate whose
//! parser is fuzzed has a `tests/fuzz_corpus.rs` that runs the same checks as the target on
//! [`inputs`]: every seed, each seed cut short and with bytes changed, and a few
//! pseudo-random inputs. [`Unstructured`] reads the structured targets' inputs (tuples of
//! strings and integers) the way the `arbitrary` crate lays them out.

use std::path::PathBuf;

/// The directory of the seeds of fuzz target `target`.
pub fn seed_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../fuzz/seeds")
        .join(target)
}

/// The seed files of `target`, by name. Panics when there are none: a replay of nothing
/// proves nothing.
pub fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let dir = seed_dir(target);
    let entries = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("fuzz seeds of {target} at {}: {e}", dir.display()));
    let mut out: Vec<(String, Vec<u8>)> = entries
        .map(|e| {
            let path = e.expect("reading the seed directory").path();
            let data = std::fs::read(&path)
                .unwrap_or_else(|e| panic!("reading seed {}: {e}", path.display()));
            (path.display().to_string(), data)
        })
        .collect();
    out.sort();
    assert!(!out.is_empty(), "no fuzz seeds in {}", dir.display());
    out
}

/// A small deterministic generator (xorshift64*), so that a failing input is the same on
/// every run.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// The inputs a replay runs for `target`: every seed; each seed cut at up to 32 points; each
/// seed with a few single bytes replaced (16 variants); and 32 pseudo-random inputs of up to
/// 64 bytes. Deterministic.
pub fn inputs(target: &str) -> Vec<Vec<u8>> {
    let seeds = seeds(target);
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut out = Vec::new();
    for (_, seed) in &seeds {
        out.push(seed.clone());
        let step = (seed.len() / 32).max(1);
        for cut in (0..seed.len()).step_by(step) {
            out.push(seed[..cut].to_vec());
        }
        if !seed.is_empty() {
            for _ in 0..16 {
                let mut s = seed.clone();
                for _ in 0..1 + rng.below(3) {
                    let at = rng.below(s.len());
                    s[at] = rng.next() as u8;
                }
                out.push(s);
            }
        }
    }
    for _ in 0..32 {
        let len = rng.below(65);
        out.push((0..len).map(|_| rng.next() as u8).collect());
    }
    out
}

/// The inputs of a `&str` target: those of [`inputs`] that are UTF-8 (libFuzzer's `&str`
/// targets skip the others the same way).
pub fn text_inputs(target: &str) -> Vec<String> {
    inputs(target)
        .into_iter()
        .filter_map(|b| String::from_utf8(b).ok())
        .collect()
}

/// Reads typed values from fuzz input bytes as `arbitrary` 1.x does for the shapes the targets
/// use: integers little-endian from the front (zero once the bytes run out), a string's
/// length from the back, the last value taking the rest.
pub struct Unstructured<'a>(&'a [u8]);

impl<'a> Unstructured<'a> {
    /// Reads from `data`.
    pub fn new(data: &'a [u8]) -> Self {
        Self(data)
    }

    fn take(&mut self, n: usize) -> &'a [u8] {
        let (a, b) = self.0.split_at(n.min(self.0.len()));
        self.0 = b;
        a
    }

    /// An unsigned integer of `bytes` bytes (at most 8).
    pub fn uint(&mut self, bytes: usize) -> u64 {
        self.take(bytes)
            .iter()
            .enumerate()
            .fold(0, |x, (i, b)| x | u64::from(*b) << (8 * i))
    }

    /// A `bool` (the low bit of a byte).
    pub fn bool(&mut self) -> bool {
        self.uint(1) & 1 == 1
    }

    /// A string that is not the last value: its length is read from the end of the data, and
    /// invalid UTF-8 is cut at its first error.
    pub fn str(&mut self) -> &'a str {
        let len = self.0.len();
        let size = match len {
            0 | 1 => {
                self.0 = &[];
                0
            }
            _ => {
                let width = if len <= 256 {
                    1
                } else if len <= 65_536 {
                    2
                } else {
                    4
                };
                let (rest, for_size) = self.0.split_at(len - width);
                self.0 = rest;
                let n = for_size.iter().fold(0u64, |x, b| (x << 8) | u64::from(*b));
                (n % (rest.len() as u64 + 1)) as usize
            }
        };
        let bytes = self.take(size);
        match std::str::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => std::str::from_utf8(&bytes[..e.valid_up_to()]).unwrap_or_default(),
        }
    }

    /// The rest of the data as a string, `None` when it is not UTF-8 (the target then returns
    /// without running).
    pub fn rest_str(self) -> Option<&'a str> {
        std::str::from_utf8(self.0).ok()
    }

    /// The rest of the data.
    pub fn rest(self) -> &'a [u8] {
        self.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_content_range_seed_reads_as_its_text_and_numbers() {
        let mut data = b"bytes 0-99/100".to_vec();
        data.extend(1u8..=24);
        data.push(14);
        let mut u = Unstructured::new(&data);
        assert_eq!(u.str(), "bytes 0-99/100");
        assert_eq!(u.uint(8), u64::from_le_bytes([1, 2, 3, 4, 5, 6, 7, 8]));
    }

    #[test]
    fn every_target_has_seeds() {
        for t in ["frame_decode", "task_id", "parse_size", "manager_config"] {
            assert!(inputs(t).len() > seeds(t).len());
        }
    }
}
