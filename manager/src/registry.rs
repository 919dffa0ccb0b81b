//! Resolving an image to its layer blob URLs through a registry's manifest API.
//!
//! `GET /v2/<name>/manifests/<reference>` with `Accept` for OCI and Docker manifests and
//! indexes; an index (manifest list) is narrowed to one platform and fetched again by digest.
//! A `401` with `WWW-Authenticate: Bearer realm=…,service=…,scope=…` is answered by fetching
//! a token from the realm (with basic credentials when given) and retrying; `Basic`
//! challenges are answered with the credentials. The resulting blob URLs carry the same
//! `Authorization` header so that seed peers can fetch them.
//!
//! Parsing an image reference is in `registry/image_ref.rs`.

use sha2::{Digest as _, Sha256};
use std::time::Duration;

use serde::Deserialize;
use url::Url;

mod image_ref;

pub use image_ref::ImageRef;

/// Most bytes read from a manifest or token response (registries cap manifests at 4 MiB).
pub const MAX_BODY: usize = 4 << 20;

/// Accept header for every manifest kind we understand.
pub const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.index.v1+json, \
application/vnd.docker.distribution.manifest.list.v2+json, \
application/vnd.oci.image.manifest.v1+json, \
application/vnd.docker.distribution.manifest.v2+json";

/// Errors while resolving an image.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The image reference or manifest URL does not parse.
    #[error("bad image reference {0:?}: {1}")]
    BadReference(String, String),
    /// An HTTP request failed.
    #[error("registry request to {0} failed: {1}")]
    Http(String, String),
    /// The registry answered with an unexpected status.
    #[error("registry answered {status} for {url}")]
    Status {
        /// The request URL.
        url: String,
        /// The HTTP status.
        status: u16,
    },
    /// The registry answered `401` again after its challenge was answered with the job's
    /// credentials (or the token they bought).
    #[error("registry refused the job's credentials for {0} (401 after answering its auth challenge): wrong username or password?")]
    Unauthorized(String),
    /// The registry's answer does not make sense.
    #[error("bad registry response: {0}")]
    BadResponse(String),
    /// No manifest for the requested platform in the index.
    #[error("no manifest for platform {0} in the image index")]
    NoPlatform(String),
}

/// One layer to preheat.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layer {
    /// Blob URL.
    pub url: String,
    /// Content digest (`sha256:<hex>`).
    pub digest: String,
}

/// An image resolved to layers, with the headers needed to fetch them.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Resolved {
    /// Layers in manifest order.
    pub layers: Vec<Layer>,
    /// The image config blob, when the manifest names one (a pull fetches it like a layer,
    /// through the registry mirror; so a preheat fetches it too).
    pub config: Option<Layer>,
    /// Headers for the blob requests (the registry token, when one was needed).
    pub headers: Vec<(String, String)>,
}

/// Basic credentials for a registry.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Credentials {
    /// User name.
    pub username: String,
    /// Password or access token.
    pub password: String,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Manifest {
    #[serde(default)]
    media_type: String,
    #[serde(default)]
    manifests: Option<Vec<Descriptor>>,
    #[serde(default)]
    layers: Option<Vec<Descriptor>>,
    #[serde(default)]
    config: Option<Descriptor>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    #[serde(default)]
    platform: Option<Platform>,
}

#[derive(Debug, Deserialize)]
struct Platform {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default)]
    variant: Option<String>,
}

#[derive(Debug, Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
}

/// Talks to registries.
#[derive(Debug, Clone)]
pub struct Resolver {
    client: reqwest::Client,
}

impl Resolver {
    /// A resolver whose requests each take at most `timeout`.
    pub fn new(timeout: Duration) -> Result<Self, RegistryError> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .user_agent(concat!("damselfly-manager/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| RegistryError::Http("client".into(), e.to_string()))?;
        Ok(Self { client })
    }

    /// Resolves an image to its layer blobs for `platform` (`os/arch[/variant]`).
    pub async fn resolve(
        &self,
        image: &ImageRef,
        platform: &str,
        creds: Option<&Credentials>,
    ) -> Result<Resolved, RegistryError> {
        let mut auth: Option<String> = None;
        // A reference that is a digest names the manifest's bytes: they must hash to it.
        let by_digest = image
            .reference
            .starts_with("sha256:")
            .then_some(image.reference.as_str());
        let mut manifest: Manifest = self
            .get_json(
                &image.manifest_url(&image.reference),
                by_digest,
                &mut auth,
                creds,
            )
            .await?;
        if let Some(list) = manifest.manifests.take() {
            let digest = pick_platform(&list, platform)?;
            manifest = self
                .get_json(
                    &image.manifest_url(&digest),
                    Some(&digest),
                    &mut auth,
                    creds,
                )
                .await?;
            if manifest.manifests.is_some() {
                return Err(RegistryError::BadResponse(
                    "image index points to another index".into(),
                ));
            }
        }
        let layers = manifest.layers.ok_or_else(|| {
            RegistryError::BadResponse(format!(
                "manifest of media type {:?} has no layers",
                manifest.media_type
            ))
        })?;
        let layers = layers
            .into_iter()
            .map(|d| {
                check_digest(&d.digest)?;
                Ok(Layer {
                    url: image.blob_url(&d.digest),
                    digest: d.digest,
                })
            })
            .collect::<Result<Vec<_>, RegistryError>>()?;
        let config = match manifest.config {
            Some(d) => {
                check_digest(&d.digest)?;
                Some(Layer {
                    url: image.blob_url(&d.digest),
                    digest: d.digest,
                })
            }
            None => None,
        };
        let headers = auth
            .map(|a| vec![("Authorization".to_owned(), a)])
            .unwrap_or_default();
        Ok(Resolved {
            layers,
            config,
            headers,
        })
    }

    /// GETs a manifest; answers one auth challenge (updating `auth`) and retries once. With
    /// `digest` (`sha256:<hex>`, the manifest was asked for by digest) the body must hash to
    /// it, or the answer is refused: a registry (or anything between) cannot swap the layers.
    async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        digest: Option<&str>,
        auth: &mut Option<String>,
        creds: Option<&Credentials>,
    ) -> Result<T, RegistryError> {
        let mut challenged = false;
        loop {
            let mut req = self
                .client
                .get(url)
                .header(reqwest::header::ACCEPT, MANIFEST_ACCEPT);
            if let Some(a) = auth.as_deref() {
                req = req.header(reqwest::header::AUTHORIZATION, a);
            }
            let resp = req
                .send()
                .await
                .map_err(|e| RegistryError::Http(url.to_owned(), e.to_string()))?;
            let status = resp.status().as_u16();
            if status == 401 && !challenged {
                challenged = true;
                let challenge = resp
                    .headers()
                    .get(reqwest::header::WWW_AUTHENTICATE)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                *auth = Some(self.answer_challenge(&challenge, creds).await?);
                continue;
            }
            if status == 401 {
                return Err(RegistryError::Unauthorized(url.to_owned()));
            }
            if !(200..300).contains(&status) {
                return Err(RegistryError::Status {
                    url: url.to_owned(),
                    status,
                });
            }
            let body = read_limited(resp, url).await?;
            if let Some(want) = digest {
                check_digest(want)?;
                let got = format!("sha256:{}", hex::encode(Sha256::digest(&body)));
                if got != want {
                    return Err(RegistryError::BadResponse(format!(
                        "{url}: manifest does not match its digest (got {got})"
                    )));
                }
            }
            return serde_json::from_slice(&body)
                .map_err(|e| RegistryError::BadResponse(format!("{url}: {e}")));
        }
    }

    async fn answer_challenge(
        &self,
        challenge: &str,
        creds: Option<&Credentials>,
    ) -> Result<String, RegistryError> {
        let (scheme, params) = parse_challenge(challenge);
        if scheme.eq_ignore_ascii_case("basic") {
            let c = creds.ok_or_else(|| {
                RegistryError::BadResponse("registry wants basic auth; no credentials".into())
            })?;
            return Ok(basic(c));
        }
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(RegistryError::BadResponse(format!(
                "unsupported auth challenge {challenge:?}"
            )));
        }
        let realm = params
            .iter()
            .find(|(k, _)| k == "realm")
            .map(|(_, v)| v.clone())
            .ok_or_else(|| RegistryError::BadResponse("bearer challenge without realm".into()))?;
        let mut token_url = Url::parse(&realm)
            .map_err(|e| RegistryError::BadResponse(format!("bad realm {realm:?}: {e}")))?;
        if !matches!(token_url.scheme(), "http" | "https") {
            return Err(RegistryError::BadResponse(format!(
                "bad realm scheme {realm:?}"
            )));
        }
        {
            let mut q = token_url.query_pairs_mut();
            for (k, v) in &params {
                if k == "service" || k == "scope" {
                    q.append_pair(k, v);
                }
            }
        }
        let mut req = self.client.get(token_url.as_str());
        if let Some(c) = creds {
            req = req.basic_auth(&c.username, Some(&c.password));
        }
        let resp = req
            .send()
            .await
            .map_err(|e| RegistryError::Http(token_url.to_string(), e.to_string()))?;
        let status = resp.status().as_u16();
        if !(200..300).contains(&status) {
            return Err(RegistryError::Status {
                url: token_url.to_string(),
                status,
            });
        }
        let body = read_limited(resp, token_url.as_str()).await?;
        let t: TokenResponse = serde_json::from_slice(&body)
            .map_err(|e| RegistryError::BadResponse(format!("token response: {e}")))?;
        let token = t
            .token
            .or(t.access_token)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| RegistryError::BadResponse("token response without token".into()))?;
        Ok(format!("Bearer {token}"))
    }
}

fn basic(c: &Credentials) -> String {
    use std::io::Write as _;
    let mut raw = Vec::new();
    let _ = write!(raw, "{}:{}", c.username, c.password);
    format!("Basic {}", base64(&raw))
}

/// Standard base64 with padding (no dependency for one header).
fn base64(data: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(ALPHABET[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

async fn read_limited(mut resp: reqwest::Response, url: &str) -> Result<Vec<u8>, RegistryError> {
    if resp.content_length().is_some_and(|n| n > MAX_BODY as u64) {
        return Err(RegistryError::BadResponse(format!(
            "{url}: body larger than {MAX_BODY} bytes"
        )));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp
        .chunk()
        .await
        .map_err(|e| RegistryError::Http(url.to_owned(), e.to_string()))?
    {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(RegistryError::BadResponse(format!(
                "{url}: body larger than {MAX_BODY} bytes"
            )));
        }
        body.extend_from_slice(&chunk);
    }
    Ok(body)
}

fn check_digest(d: &str) -> Result<(), RegistryError> {
    let ok = match d.split_once(':') {
        Some(("sha256", hex)) => hex.len() == 64,
        Some(("sha512", hex)) => hex.len() == 128,
        _ => false,
    } && d.split_once(':').is_some_and(|(_, h)| {
        h.chars()
            .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase())
    });
    if ok {
        Ok(())
    } else {
        Err(RegistryError::BadResponse(format!("bad digest {d:?}")))
    }
}

fn pick_platform(list: &[Descriptor], platform: &str) -> Result<String, RegistryError> {
    let mut want = platform.split('/');
    let os = want.next().unwrap_or_default();
    let arch = want.next().unwrap_or_default();
    let variant = want.next();
    let found = list.iter().find(|d| {
        d.platform.as_ref().is_some_and(|p| {
            p.os == os
                && p.architecture == arch
                && variant.is_none_or(|v| p.variant.as_deref() == Some(v))
        }) && !d.media_type.contains("attestation")
    });
    let d = found.ok_or_else(|| RegistryError::NoPlatform(platform.to_owned()))?;
    check_digest(&d.digest)?;
    Ok(d.digest.clone())
}

/// Splits `Bearer realm="x",service="y"` into the scheme and its parameters (quoted values
/// may hold commas).
pub fn parse_challenge(h: &str) -> (String, Vec<(String, String)>) {
    let h = h.trim();
    let (scheme, rest) = h.split_once(' ').unwrap_or((h, ""));
    let mut params = Vec::new();
    let mut chars = rest.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' {
                break;
            }
            key.push(c);
            chars.next();
        }
        if key.is_empty() || chars.next() != Some('=') {
            break;
        }
        let mut value = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => {
                        if let Some(n) = chars.next() {
                            value.push(n);
                        }
                    }
                    '"' => break,
                    c => value.push(c),
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c == ',' {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        params.push((key.trim().to_ascii_lowercase(), value.trim().to_owned()));
    }
    (scheme.to_owned(), params)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn challenges() {
        let (s, p) = parse_challenge(
            r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:library/alpine:pull,push""#,
        );
        assert_eq!(s, "Bearer");
        assert_eq!(
            p,
            vec![
                ("realm".into(), "https://auth.docker.io/token".into()),
                ("service".into(), "registry.docker.io".into()),
                ("scope".into(), "repository:library/alpine:pull,push".into()),
            ]
        );
        let (s, p) = parse_challenge("Basic realm=x");
        assert_eq!((s.as_str(), p.len()), ("Basic", 1));
        assert_eq!(parse_challenge("").1.len(), 0);
    }

    #[test]
    fn base64_matches_rfc4648() {
        assert_eq!(base64(b""), "");
        assert_eq!(base64(b"f"), "Zg==");
        assert_eq!(base64(b"fo"), "Zm8=");
        assert_eq!(base64(b"foo"), "Zm9v");
        assert_eq!(base64(b"user:pass"), "dXNlcjpwYXNz");
    }

    #[test]
    fn digests() {
        assert!(check_digest(&format!("sha256:{}", "0".repeat(64))).is_ok());
        assert!(check_digest("sha256:abc").is_err());
        assert!(check_digest(&format!("sha256:{}", "A".repeat(64))).is_err());
        assert!(check_digest(&format!("md5:{}", "0".repeat(64))).is_err());
    }
}
