//! `wire::TaskId::from_url` (URLs from dfget, the scheduler and preheat requests) and
//! `TaskId::parse` (ids on the wire and in the local API) on arbitrary strings. The input is
//! `url NUL tag NUL application NUL filtered-param NUL …`, so that text seeds are readable.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::task::{TaskId, TaskIdOptions};

#[global_allocator]
static ALLOC: damselfly_fuzz::CappedAlloc = damselfly_fuzz::CappedAlloc;

fuzz_target!(|text: &str| {
    let mut parts = text.split('\0');
    let url = parts.next().unwrap_or_default();
    let tag = parts.next().unwrap_or_default();
    let application = parts.next().unwrap_or_default();
    let filtered: Vec<String> = parts.map(str::to_owned).collect();
    let piece_length = (text.len() as u64 % 3) << 20;
    let opts = TaskIdOptions { tag, application, piece_length, filtered_query_params: &filtered };
    if let Ok(id) = TaskId::from_url(url, &opts) {
        assert_eq!(TaskId::from_url(url, &opts), Ok(id));
        assert_eq!(TaskId::parse(&id.to_hex()), Ok(id));
    }
    if let Ok(id) = TaskId::parse(url) {
        assert_eq!(id.to_hex(), url.to_ascii_lowercase());
    }
});
