//! The manager's `WWW-Authenticate` challenge parser (`manager::registry::parse_challenge`),
//! fed by any registry a preheat request names: no panic, and every parameter name is
//! trimmed, lower case and not empty.
#![no_main]

use libfuzzer_sys::fuzz_target;
use manager::registry::parse_challenge;

#[global_allocator]
static ALLOC: damselfly_fuzz::CappedAlloc = damselfly_fuzz::CappedAlloc;

fuzz_target!(|header: &str| {
    let (scheme, params) = parse_challenge(header);
    assert!(!scheme.contains(' '));
    for (key, _) in &params {
        assert!(!key.is_empty(), "{header:?}");
        assert_eq!(key.trim(), key);
        assert_eq!(&key.to_ascii_lowercase(), key);
    }
});
