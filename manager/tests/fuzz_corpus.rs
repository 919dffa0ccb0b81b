//! The seed corpora of the manager's fuzz targets (`fuzz/fuzz_targets/{manager_config,
//! image_ref,www_authenticate}.rs`), replayed through the same checks as an ordinary test, so
//! that `cargo test` runs them without libFuzzer (see `needs::fuzz`).

use damselfly_manager::config::Config;
use damselfly_manager::registry::{parse_challenge, ImageRef};
use needs::fuzz::{inputs, text_inputs, Unstructured};
use url::Url;

#[test]
fn manager_config_corpus() {
    let mut accepted = 0;
    for text in text_inputs("manager_config") {
        let Ok(config) = Config::parse(&text) else {
            continue;
        };
        let yaml = serde_yaml::to_string(&config).expect("a config serialises");
        let again = Config::parse(&yaml).expect("a written config reads back");
        assert_eq!(again, config, "{yaml}");
        accepted += 1;
    }
    assert!(accepted > 0, "no seed is an accepted manager config");
}

#[test]
fn image_ref_corpus() {
    let mut accepted = 0;
    for data in inputs("image_ref") {
        let mut u = Unstructured::new(&data);
        let insecure = u.bool();
        let Some(text) = u.rest_str() else {
            continue;
        };
        let Ok(image) = ImageRef::parse(text, insecure) else {
            continue;
        };
        accepted += 1;
        let manifest = image.manifest_url(&image.reference);
        let url = Url::parse(&manifest).unwrap_or_else(|e| panic!("{manifest:?}: {e}"));
        let path = format!("/v2/{}/manifests/{}", image.repository, image.reference);
        assert_eq!(url.path(), path, "{manifest:?}");
        assert!(
            url.username().is_empty() && url.password().is_none(),
            "{manifest:?}"
        );
        assert!(
            url.query().is_none() && url.fragment().is_none(),
            "{manifest:?}"
        );
        assert!(
            url.host_str().is_some_and(|h| !h.is_empty()),
            "{manifest:?}"
        );
        let again = ImageRef::parse(&manifest, insecure).expect("a manifest URL parses");
        assert_eq!(
            (again.repository, again.reference),
            (image.repository, image.reference)
        );
        assert_eq!(again.scheme, image.scheme);
    }
    assert!(accepted > 0, "no seed is an accepted image reference");
}

#[test]
fn www_authenticate_corpus() {
    let mut params = 0;
    for header in text_inputs("www_authenticate") {
        let (scheme, found) = parse_challenge(&header);
        assert!(!scheme.contains(' '));
        for (key, _) in &found {
            assert!(!key.is_empty(), "{header:?}");
            assert_eq!(key.trim(), key);
            assert_eq!(&key.to_ascii_lowercase(), key);
        }
        params += found.len();
    }
    assert!(params > 0, "no seed is a challenge with parameters");
}
