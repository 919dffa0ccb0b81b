//! The HTTP `Range` request header (RFC 9110 §14.2) against a body of known length: one
//! interpretation for every server in the tree (the registry proxy, the test origin, the
//! burst lab's origin).

/// What a `Range` header asks of a body of known length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RangeAsk {
    /// No usable range: answer 200 with the whole body. That is the answer to no header,
    /// several ranges, another unit, an invalid value (RFC 9110 allows ignoring them), and
    /// any range of an empty body (so `bytes=0-` of an empty file gets a plain 200).
    Full,
    /// Bytes `start..end` (end exclusive): 206.
    Part(u64, u64),
    /// A single byte range that starts at or past the end (or `bytes=-0`): 416.
    Unsatisfiable,
}

/// Interprets the value of a `Range` header (`bytes=a-b`, `bytes=a-`, `bytes=-n`) for a body
/// of `len` bytes.
pub fn parse_range(value: &str, len: u64) -> RangeAsk {
    let Some(spec) = value.trim().strip_prefix("bytes=") else {
        return RangeAsk::Full;
    };
    if spec.contains(',') || len == 0 {
        return RangeAsk::Full;
    }
    let Some((a, b)) = spec.trim().split_once('-') else {
        return RangeAsk::Full;
    };
    let (a, b) = (a.trim(), b.trim());
    // Digits only: `u64::from_str` would also take a `+` sign.
    let num = |s: &str| -> Option<u64> {
        if s.is_empty() || !s.bytes().all(|c| c.is_ascii_digit()) {
            None
        } else {
            s.parse().ok()
        }
    };
    if a.is_empty() {
        // Suffix: the last n bytes.
        return match num(b) {
            Some(0) => RangeAsk::Unsatisfiable,
            Some(n) => RangeAsk::Part(len - n.min(len), len),
            None => RangeAsk::Full,
        };
    }
    let Some(start) = num(a) else {
        return RangeAsk::Full;
    };
    let end = if b.is_empty() {
        len
    } else {
        match num(b) {
            Some(last) if last >= start => last.saturating_add(1).min(len),
            // last < first makes the header invalid: ignore it.
            _ => return RangeAsk::Full,
        }
    };
    if start >= len {
        return RangeAsk::Unsatisfiable;
    }
    RangeAsk::Part(start, end)
}

#[cfg(test)]
mod tests {
    use super::{parse_range, RangeAsk};

    #[test]
    fn ranges() {
        for (value, len, want) in [
            ("", 100, RangeAsk::Full),
            ("bytes=0-", 100, RangeAsk::Part(0, 100)),
            ("bytes=10-19", 100, RangeAsk::Part(10, 20)),
            (" bytes= 10 - 19 ", 100, RangeAsk::Part(10, 20)),
            ("bytes=90-500", 100, RangeAsk::Part(90, 100)),
            ("bytes=99-99", 100, RangeAsk::Part(99, 100)),
            ("bytes=-10", 100, RangeAsk::Part(90, 100)),
            ("bytes=-500", 100, RangeAsk::Part(0, 100)),
            ("bytes=-0", 100, RangeAsk::Unsatisfiable),
            ("bytes=100-", 100, RangeAsk::Unsatisfiable),
            ("bytes=100-200", 100, RangeAsk::Unsatisfiable),
            ("bytes=0-1,5-6", 100, RangeAsk::Full),
            ("bytes=5-1", 100, RangeAsk::Full),
            ("items=0-1", 100, RangeAsk::Full),
            ("bytes=x-", 100, RangeAsk::Full),
            ("bytes=+5-", 100, RangeAsk::Full),
            ("bytes=a-b", 100, RangeAsk::Full),
            ("bytes=-", 100, RangeAsk::Full),
            ("bytes=5", 100, RangeAsk::Full),
            ("bytes=0-", 0, RangeAsk::Full),
            ("bytes=-5", 0, RangeAsk::Full),
            ("bytes=18446744073709551615-", 100, RangeAsk::Unsatisfiable),
            ("bytes=0-18446744073709551615", 100, RangeAsk::Part(0, 100)),
        ] {
            assert_eq!(parse_range(value, len), want, "{value:?} of {len}");
        }
    }
}
