//! The seed corpora of the control plane's fuzz targets (`fuzz/fuzz_targets/{content_range,
//! daemon_config,parse_size}.rs`), replayed through the same checks as an ordinary test, so
//! that `cargo test` runs them without libFuzzer (see `needs::fuzz`).

use damselfly_controlplane::config::{parse_size, DaemonConfig};
use damselfly_controlplane::origin::{content_range_start, content_range_total};
use needs::fuzz::{inputs, text_inputs, Unstructured};

#[test]
fn content_range_corpus() {
    let mut accepted = 0;
    for data in inputs("content_range") {
        let mut u = Unstructured::new(&data);
        let value = u.str();
        let (start, end, total) = (u.uint(8), u.uint(8), u.uint(8));
        accepted += usize::from(content_range_total(value).is_some());
        let _ = content_range_start(value);
        let v = format!("bytes {start}-{end}/{total}");
        assert_eq!(content_range_total(&v), Some(total), "{v}");
        assert_eq!(content_range_start(&v), Some(start), "{v}");
        assert_eq!(
            content_range_total(&format!("bytes */{total}")),
            Some(total)
        );
    }
    assert!(accepted > 0, "no seed is a Content-Range with a total");
}

#[test]
fn daemon_config_corpus() {
    let mut accepted = 0;
    for text in text_inputs("daemon_config") {
        if let Ok(config) = serde_yaml::from_str::<DaemonConfig>(&text) {
            let _ = config.data_plane.shaping();
            accepted += 1;
        }
    }
    assert!(accepted > 0, "no seed is an accepted daemon config");
}

#[test]
fn parse_size_corpus() {
    let mut accepted = 0;
    for text in text_inputs("parse_size") {
        if let Ok(n) = parse_size(&text) {
            assert_eq!(parse_size(&n.to_string()), Ok(n), "{text:?}");
            accepted += 1;
        }
    }
    assert!(accepted > 0, "no seed is an accepted size");
}
