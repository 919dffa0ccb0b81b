//! The origin's `Content-Range` parsers (`controlplane::origin::content_range_total` and
//! `content_range_start`) on arbitrary header values, and on well-formed values built from
//! arbitrary numbers, which must parse back to those numbers.
#![no_main]

use controlplane::origin::{content_range_start, content_range_total};
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: damselfly_fuzz::CappedAlloc = damselfly_fuzz::CappedAlloc;

fuzz_target!(|input: (&str, u64, u64, u64)| {
    let (value, start, end, total) = input;
    let _ = content_range_total(value);
    let _ = content_range_start(value);
    let v = format!("bytes {start}-{end}/{total}");
    assert_eq!(content_range_total(&v), Some(total));
    assert_eq!(content_range_start(&v), Some(start));
    assert_eq!(content_range_total(&format!("bytes */{total}")), Some(total));
});
