//! [`ImageRef`]: an image reference (`registry/repository:tag`, `@digest`, or a manifest
//! URL) parsed into registry, repository and reference, and the URLs built from it.

use url::Url;

use super::RegistryError;

/// A parsed image: which registry, repository and tag or digest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageRef {
    /// `https` or `http`.
    pub scheme: String,
    /// Registry host with optional port (Docker Hub is `registry-1.docker.io`).
    pub registry: String,
    /// Repository (`library/alpine`).
    pub repository: String,
    /// Tag or digest.
    pub reference: String,
}

impl ImageRef {
    /// Parses either a manifest URL (`https://host/v2/<name>/manifests/<ref>`, the form
    /// Dragonfly's preheat takes) or an image reference (`[host[:port]/]name[:tag|@digest]`,
    /// Docker Hub when no host; `https` unless `insecure`).
    pub fn parse(s: &str, insecure: bool) -> Result<Self, RegistryError> {
        let bad = |why: &str| RegistryError::BadReference(s.to_owned(), why.to_owned());
        if s.starts_with("http://") || s.starts_with("https://") {
            let url = Url::parse(s).map_err(|e| bad(&e.to_string()))?;
            let host = url.host_str().ok_or_else(|| bad("no host"))?;
            let registry = match url.port() {
                Some(p) => format!("{host}:{p}"),
                None => host.to_owned(),
            };
            let path = url.path();
            let rest = path
                .strip_prefix("/v2/")
                .ok_or_else(|| bad("path must start with /v2/"))?;
            let (repository, reference) = rest
                .rsplit_once("/manifests/")
                .ok_or_else(|| bad("path must contain /manifests/"))?;
            let image = Self {
                scheme: url.scheme().to_owned(),
                registry,
                repository: repository.to_owned(),
                reference: reference.to_owned(),
            };
            image.check().map_err(|why| bad(&why))?;
            return Ok(image);
        }
        let (first, remainder) = s.split_once('/').unwrap_or(("", s));
        let is_host = !first.is_empty()
            && (first.contains('.') || first.contains(':') || first == "localhost");
        let (registry, path) = if is_host {
            (first.to_owned(), remainder.to_owned())
        } else {
            ("registry-1.docker.io".to_owned(), s.to_owned())
        };
        let (name, reference) = if let Some((n, d)) = path.split_once('@') {
            (n.to_owned(), d.to_owned())
        } else {
            match path.rsplit_once(':') {
                Some((n, t)) if !t.contains('/') => (n.to_owned(), t.to_owned()),
                _ => (path.clone(), "latest".to_owned()),
            }
        };
        let registry = if registry == "docker.io" || registry == "index.docker.io" {
            "registry-1.docker.io".to_owned()
        } else {
            registry
        };
        let repository = if registry == "registry-1.docker.io" && !name.contains('/') {
            format!("library/{name}")
        } else {
            name
        };
        let image = Self {
            scheme: if insecure { "http" } else { "https" }.to_owned(),
            registry,
            repository,
            reference,
        };
        image.check().map_err(|why| bad(&why))?;
        Ok(image)
    }

    fn check(&self) -> Result<(), String> {
        // The registry is spliced into every request URL, so it must be a host with an
        // optional port and nothing else: no user info, path, query or fragment riding along,
        // and no port the URL parser rejects.
        let registry_ok = self
            .registry
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || ".-:[]".contains(c))
            && Url::parse(&format!("{}://{}/", self.scheme, self.registry))
                .is_ok_and(|u| u.host_str().is_some_and(|h| !h.is_empty()) && u.path() == "/");
        if !registry_ok {
            return Err(format!("invalid registry {:?}", self.registry));
        }
        let repo_ok = !self.repository.is_empty()
            && self.repository.split('/').all(|c| {
                c.starts_with(|ch: char| ch.is_ascii_alphanumeric())
                    && c.ends_with(|ch: char| ch.is_ascii_alphanumeric())
                    && c.chars().all(|ch| {
                        ch.is_ascii_lowercase() || ch.is_ascii_digit() || "._-".contains(ch)
                    })
            });
        if !repo_ok {
            return Err(format!("invalid repository {:?}", self.repository));
        }
        // A tag starts with a word character (Docker's grammar, and a digest starts with its
        // algorithm): a reference of `.` or `..` would be a dot segment, which the URL parser
        // removes, so the request would go to another path.
        let ref_ok = self
            .reference
            .starts_with(|ch: char| ch.is_ascii_alphanumeric() || ch == '_')
            && self.reference.len() <= 128 + 8
            && self
                .reference
                .chars()
                .all(|ch| ch.is_ascii_alphanumeric() || "._-:".contains(ch));
        if !ref_ok {
            return Err(format!("invalid tag or digest {:?}", self.reference));
        }
        Ok(())
    }

    fn base(&self) -> String {
        format!("{}://{}/v2/{}", self.scheme, self.registry, self.repository)
    }

    /// URL of a manifest of this repository.
    pub fn manifest_url(&self, reference: &str) -> String {
        format!("{}/manifests/{reference}", self.base())
    }

    /// URL of a blob of this repository.
    pub fn blob_url(&self, digest: &str) -> String {
        format!("{}/blobs/{digest}", self.base())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn references() {
        let r = ImageRef::parse("alpine", false).expect("parse");
        assert_eq!(r.registry, "registry-1.docker.io");
        assert_eq!(r.repository, "library/alpine");
        assert_eq!(r.reference, "latest");
        let r = ImageRef::parse("localhost:5000/team/app:1.2", true).expect("parse");
        assert_eq!(
            r.manifest_url("1.2"),
            "http://localhost:5000/v2/team/app/manifests/1.2"
        );
        let d = format!("sha256:{}", "a".repeat(64));
        let r = ImageRef::parse(&format!("ghcr.io/o/app@{d}"), false).expect("parse");
        assert_eq!(r.reference, d);
        let r = ImageRef::parse(
            "https://index.docker.io/v2/library/alpine/manifests/3.19",
            false,
        )
        .expect("parse");
        assert_eq!(r.registry, "index.docker.io");
        assert_eq!(r.repository, "library/alpine");
        assert_eq!(r.reference, "3.19");
        assert!(ImageRef::parse("https://h/x/manifests/1", false).is_err());
        assert!(ImageRef::parse("Bad/Name", false).is_err());
        assert!(ImageRef::parse("h.io/a/../b:1", false).is_err());
    }

    #[test]
    fn registry_must_be_a_host_and_port() {
        // Found by fuzz/fuzz_targets/image_ref.rs: the registry part was not checked, so these
        // were accepted and gave a manifest URL that does not parse, or one whose user info,
        // query or fragment sends the request somewhere other than the named registry.
        for bad in [
            "localhost:500\u{f}/team/app:1.2",
            "localhost:99999/app",
            "user@evil.io/app:1",
            "evil.io?.real.io/app:1",
            "evil.io#.real.io/app:1",
            "a.b c/app",
            ":5000/app",
        ] {
            assert!(ImageRef::parse(bad, false).is_err(), "{bad:?}");
        }
        // Also found by the fuzzer: a tag of `.` or `..` became a dot segment of the URL.
        for bad in [
            "https:.",
            "alpine:..",
            "h.io/app:.",
            "https://h.io/v2/app/manifests/..",
        ] {
            assert!(ImageRef::parse(bad, false).is_err(), "{bad:?}");
        }
        for good in [
            "localhost:5000/app",
            "[::1]:5000/a/b:1",
            "Registry.Example.com/app",
        ] {
            let r = ImageRef::parse(good, true).expect(good);
            let url = Url::parse(&r.manifest_url(&r.reference)).expect("manifest URL parses");
            assert_eq!(
                url.path(),
                format!("/v2/{}/manifests/{}", r.repository, r.reference)
            );
        }
    }
}
