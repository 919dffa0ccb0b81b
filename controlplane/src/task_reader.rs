//! Reading part of a task while it downloads: wait until the pieces covering a byte range
//! are stored, then read them from the task file. Used by `dfget --range` and usable by
//! anything that serves byte ranges of a task (the registry proxy).

use crate::error::DownloadError;
use crate::task::TaskState;
use dataplane::{Storage, TaskStore};
use std::ops::Range;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use tokio::sync::watch;
use wire::TaskId;

/// A byte range as a client asks for it (HTTP semantics): `start` to `end` inclusive, or to
/// the end of the content when `end` is `None`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteRange {
    /// First byte.
    pub start: u64,
    /// Last byte, inclusive; `None`: through the last byte of the content.
    pub end: Option<u64>,
}

impl ByteRange {
    /// Parses `START-END` or `START-` (decimal byte offsets, `END` inclusive, as in an HTTP
    /// `Range: bytes=` header without the `bytes=` prefix; a `bytes=` prefix is accepted too).
    /// Suffix ranges (`-N`) and lists are refused.
    pub fn parse(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let t = t.strip_prefix("bytes=").unwrap_or(t);
        let bad = || {
            format!("range {s:?} must look like START-END or START- (byte offsets, END inclusive)")
        };
        let (a, b) = t.split_once('-').ok_or_else(bad)?;
        if a.is_empty() {
            return Err(format!(
                "range {s:?}: suffix ranges (-N) are not supported; use START-END or START-"
            ));
        }
        let start: u64 = a.trim().parse().map_err(|_| bad())?;
        let end = if b.trim().is_empty() {
            None
        } else {
            let e: u64 = b.trim().parse().map_err(|_| bad())?;
            if e < start {
                return Err(format!("range {s:?}: END {e} is before START {start}"));
            }
            Some(e)
        };
        Ok(Self { start, end })
    }

    /// The half-open byte range within `content_length` bytes, or an error when the range
    /// starts at or past the end (HTTP 416). An `end` past the content is clamped.
    pub fn resolve(&self, content_length: u64) -> Result<Range<u64>, String> {
        if self.start >= content_length {
            return Err(format!(
                "range start {} is not within the content ({content_length} bytes)",
                self.start
            ));
        }
        let end = self
            .end
            .map_or(content_length, |e| e.saturating_add(1).min(content_length));
        Ok(self.start..end)
    }
}

/// Pieces of `store` overlapping `range` (half-open).
fn pieces_of(store: &TaskStore, range: &Range<u64>) -> Range<u32> {
    let l = store.layout();
    if range.is_empty() {
        return 0..0;
    }
    let first = l.piece_at(range.start).unwrap_or(0);
    let last = l
        .piece_at(range.end - 1)
        .unwrap_or_else(|| l.piece_count().saturating_sub(1));
    first..last + 1
}

/// Waits until the task `id` (whose download state `state` reports) has every piece that
/// overlaps `range`, and returns its store and the resolved half-open range. Fails when the
/// download fails first or the range is outside the content.
pub async fn wait_for_range(
    storage: &Storage,
    id: &TaskId,
    state: &mut watch::Receiver<TaskState>,
    range: ByteRange,
) -> Result<(Arc<TaskStore>, Range<u64>), DownloadError> {
    loop {
        let current = state.borrow_and_update().clone();
        let store = match current {
            TaskState::Done(store, _) => Some(store),
            TaskState::Failed(e) => return Err(e),
            TaskState::Running(_) => storage.get(id),
        };
        if let Some(store) = store {
            let r = range
                .resolve(store.layout().content_length())
                .map_err(DownloadError::BadRequest)?;
            let listener = store.listen();
            if pieces_of(&store, &r).all(|n| store.has(n)) {
                return Ok((store, r));
            }
            tokio::select! {
                _ = listener => {}
                changed = state.changed() => {
                    if changed.is_err() {
                        // The run is gone; its last state is final, look at it once more.
                        if let TaskState::Running(_) = &*state.borrow() {
                            return Err(ended_without_result());
                        }
                    }
                }
            }
        } else if state.changed().await.is_err() {
            if let TaskState::Running(_) = &*state.borrow() {
                return Err(ended_without_result());
            }
        }
    }
}

/// A run that ended without saying how: its task was dropped, which happens when the
/// daemon shuts down.
pub fn ended_without_result() -> DownloadError {
    DownloadError::Cancelled("download ended without a result".into())
}

/// Reads bytes `range` of `store` into `out` (appended). Every piece of the range must be
/// stored (see [`wait_for_range`]); blocking file I/O.
pub fn read_range(store: &TaskStore, range: Range<u64>, out: &mut Vec<u8>) -> std::io::Result<()> {
    let start = out.len();
    let len = usize::try_from(range.end.saturating_sub(range.start))
        .map_err(|_| std::io::Error::other("range too large for memory"))?;
    out.resize(start + len, 0);
    store.file().read_exact_at(&mut out[start..], range.start)
}

/// Copies bytes `range` of `store` into the file `dst` (created or truncated) in chunks.
/// Every piece of the range must be stored; blocking file I/O.
pub fn copy_range_to_file(
    store: &TaskStore,
    range: Range<u64>,
    dst: &std::path::Path,
) -> std::io::Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::create(dst)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut off = range.start;
    while off < range.end {
        let n = usize::try_from((range.end - off).min(buf.len() as u64)).unwrap_or(buf.len());
        store.file().read_exact_at(&mut buf[..n], off)?;
        f.write_all(&buf[..n])?;
        off += n as u64;
    }
    f.sync_data()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_ranges() {
        assert_eq!(
            ByteRange::parse("0-99"),
            Ok(ByteRange {
                start: 0,
                end: Some(99)
            })
        );
        assert_eq!(
            ByteRange::parse("bytes=5-"),
            Ok(ByteRange {
                start: 5,
                end: None
            })
        );
        assert!(ByteRange::parse("9-3").is_err());
        assert!(ByteRange::parse("-3").is_err());
        assert!(ByteRange::parse("a-b").is_err());
        assert!(ByteRange::parse("12").is_err());
    }

    #[test]
    fn resolve_clamps_and_refuses() {
        let r = ByteRange {
            start: 10,
            end: Some(1000),
        };
        assert_eq!(r.resolve(100), Ok(10..100));
        assert_eq!(
            ByteRange {
                start: 0,
                end: Some(0)
            }
            .resolve(5),
            Ok(0..1)
        );
        assert!(ByteRange {
            start: 100,
            end: None
        }
        .resolve(100)
        .is_err());
    }
}
