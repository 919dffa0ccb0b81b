//! The `Content-Range` header of an origin's answer: its total (the task's size) and start.

/// Parses a `Content-Range` value `bytes a-b/total` or `bytes */total` into the total.
///
/// The value comes from the origin, so it is untrusted: any string gives `Some` or `None`,
/// never a panic (fuzzed by `fuzz/fuzz_targets/content_range.rs`).
pub fn content_range_total(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (_, total) = rest.split_once('/')?;
    total.trim().parse().ok()
}

/// Parses the start offset of a `Content-Range` value `bytes a-b/total`.
///
/// Like [`content_range_total`], safe on any string the origin sends.
pub fn content_range_start(v: &str) -> Option<u64> {
    let rest = v.trim().strip_prefix("bytes")?.trim_start();
    let (range, _) = rest.split_once('/')?;
    let (a, _) = range.split_once('-')?;
    a.trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_content_range() {
        assert_eq!(content_range_total("bytes 0-99/100"), Some(100));
        assert_eq!(content_range_total("bytes */0"), Some(0));
        assert_eq!(content_range_total("bytes 0-99/*"), None);
        assert_eq!(content_range_start("bytes 5-99/100"), Some(5));
        assert_eq!(content_range_total("items 0-1/2"), None);
    }
}
