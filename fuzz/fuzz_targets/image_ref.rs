//! The manager's image reference parser (`manager::registry::ImageRef::parse`, the `url` of a
//! preheat request) on arbitrary strings. An accepted reference must give a manifest URL that
//! goes to the registry it names, at exactly `/v2/<repository>/manifests/<reference>` (no
//! user info, query or fragment smuggled in through the registry part), and that URL must
//! parse back to the same repository and reference.
#![no_main]

use libfuzzer_sys::fuzz_target;
use manager::registry::ImageRef;
use url::Url;

#[global_allocator]
static ALLOC: damselfly_fuzz::CappedAlloc = damselfly_fuzz::CappedAlloc;

fuzz_target!(|input: (bool, &str)| {
    let (insecure, text) = input;
    let Ok(image) = ImageRef::parse(text, insecure) else {
        return;
    };
    let manifest = image.manifest_url(&image.reference);
    let url = Url::parse(&manifest).unwrap_or_else(|e| panic!("{manifest:?}: {e}"));
    let path = format!("/v2/{}/manifests/{}", image.repository, image.reference);
    assert_eq!(url.path(), path, "{manifest:?}");
    assert!(url.username().is_empty() && url.password().is_none(), "{manifest:?}");
    assert!(url.query().is_none() && url.fragment().is_none(), "{manifest:?}");
    assert!(url.host_str().is_some_and(|h| !h.is_empty()), "{manifest:?}");
    let again = ImageRef::parse(&manifest, insecure).expect("a manifest URL parses");
    assert_eq!((again.repository, again.reference), (image.repository, image.reference));
    assert_eq!(again.scheme, image.scheme);
});
