//! The manager's YAML configuration (`manager::config::Config::parse`) on arbitrary text: no
//! panic, and an accepted configuration written back to YAML reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use manager::config::Config;

#[global_allocator]
static ALLOC: damselfly_fuzz::CappedAlloc = damselfly_fuzz::CappedAlloc;

fuzz_target!(|text: &str| {
    let Ok(config) = Config::parse(text) else {
        return;
    };
    let yaml = serde_yaml::to_string(&config).expect("a config serialises");
    let again = Config::parse(&yaml).expect("a written config reads back");
    assert_eq!(again, config, "{yaml}");
});
