//! `controlplane::config::parse_size` (sizes and rates such as `"1.5MiB"` in dfdaemon's
//! config) on arbitrary text: no panic, and an accepted size prints to a string that parses
//! back to the same number.
#![no_main]

use controlplane::config::parse_size;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: damselfly_fuzz::CappedAlloc = damselfly_fuzz::CappedAlloc;

fuzz_target!(|text: &str| {
    if let Ok(n) = parse_size(text) {
        assert_eq!(parse_size(&n.to_string()), Ok(n), "{text:?}");
    }
});
