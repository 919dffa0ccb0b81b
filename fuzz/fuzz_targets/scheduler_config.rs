//! The scheduler's YAML configuration (`scheduler::config::Config::from_yaml`) on arbitrary
//! text: no panic, and an accepted configuration written back to YAML reads back the same.
#![no_main]

use libfuzzer_sys::fuzz_target;
use scheduler::config::Config;

#[global_allocator]
static ALLOC: damselfly_fuzz::CappedAlloc = damselfly_fuzz::CappedAlloc;

fuzz_target!(|text: &str| {
    let Ok(config) = Config::from_yaml(text) else {
        return;
    };
    let yaml = serde_yaml::to_string(&config).expect("a config serialises");
    let again = Config::from_yaml(&yaml).expect("a written config reads back");
    assert_eq!(again, config, "{yaml}");
});
