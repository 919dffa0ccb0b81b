//! dfdaemon's YAML configuration (`controlplane::config::DaemonConfig` through serde_yaml, as
//! `DaemonConfig::load` reads it), on arbitrary text.
#![no_main]

use controlplane::config::DaemonConfig;
use libfuzzer_sys::fuzz_target;

#[global_allocator]
static ALLOC: damselfly_fuzz::CappedAlloc = damselfly_fuzz::CappedAlloc;

fuzz_target!(|text: &str| {
    if let Ok(config) = serde_yaml::from_str::<DaemonConfig>(text) {
        // Whatever the file says, the derived values are computed without a panic.
        let _ = config.data_plane.shaping();
    }
});
