//! The seed corpus of the `scheduler_config` fuzz target, replayed through the same check as
//! an ordinary test, so that `cargo test` runs it without libFuzzer (see `needs::fuzz`).

use damselfly_scheduler::config::Config;
use needs::fuzz::text_inputs;

#[test]
fn scheduler_config_corpus() {
    let mut accepted = 0;
    for text in text_inputs("scheduler_config") {
        let Ok(config) = Config::from_yaml(&text) else {
            continue;
        };
        let yaml = serde_yaml::to_string(&config).expect("a config serialises");
        let again = Config::from_yaml(&yaml).expect("a written config reads back");
        assert_eq!(again, config, "{yaml}");
        accepted += 1;
    }
    assert!(accepted > 0, "no seed is an accepted scheduler config");
}
