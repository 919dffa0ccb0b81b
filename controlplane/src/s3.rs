//! Object storage back to source: `s3://bucket/key` URLs, through the `object_store` crate's
//! S3 client (see the crate README for why that crate).
//!
//! Settings come in one order: those a client gives with the download request ([`S3Request`],
//! dfget's `--storage-*` flags; for that request only), else the `origin.s3` section of
//! dfdaemon's config, else the usual AWS environment variables (`AWS_ENDPOINT`, `AWS_REGION`,
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, …), else the defaults
//! (AWS, `us-east-1`). Credentials go as a whole: when the request gives an access key, none
//! of the daemon's (config or environment) is mixed in.
//! The client trusts what the origin client trusts (`origin.ca_certs`, the system store,
//! `origin.insecure_skip_verify`). `object_store` does not retry here: the origin fetch has
//! its own resumption (`download.origin_retries`).

use crate::config::{OriginConfig, S3Config};
use crate::origin::Opened;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder, AmazonS3ConfigKey};
use object_store::path::Path as ObjectPath;
use object_store::{ClientOptions, GetOptions, GetRange, ObjectStore, RetryConfig};
use std::time::Duration;

/// An `s3://bucket/key` URL, split.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct S3Url {
    /// Bucket name.
    pub bucket: String,
    /// Object key (or, for a listing, a prefix); no leading `/`.
    pub key: String,
}

/// Whether `url` is an object-storage URL this module fetches.
pub fn is_s3(url: &str) -> bool {
    url.starts_with("s3://")
}

/// Splits `s3://bucket/key`; the key may be empty only when `allow_empty_key` (a listing of
/// the whole bucket).
pub fn parse(url: &str, allow_empty_key: bool) -> Result<S3Url, String> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| format!("{url:?} is not an s3:// URL"))?;
    let (bucket, key) = rest.split_once('/').unwrap_or((rest, ""));
    if bucket.is_empty() {
        return Err(format!("{url:?}: no bucket (s3://BUCKET/KEY)"));
    }
    if key.is_empty() && !allow_empty_key {
        return Err(format!("{url:?}: no object key (s3://BUCKET/KEY)"));
    }
    if key.contains('?') || key.contains('#') {
        return Err(format!(
            "{url:?}: query strings are not supported in s3:// URLs"
        ));
    }
    Ok(S3Url {
        bucket: bucket.to_string(),
        key: key.to_string(),
    })
}

/// Object-storage settings a client gives with one download request (dfget's `--storage-*`
/// flags; the local API's `ObjectStorage`). `None` or empty: the daemon's own setting. They
/// live with the request's task spec only: never sent to the scheduler or other peers, not
/// part of the task id; `Debug` redacts the secret and the token.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Request {
    /// Endpoint URL.
    pub endpoint: Option<String>,
    /// Region.
    pub region: Option<String>,
    /// Access key id (always with `secret_access_key`).
    pub access_key_id: Option<String>,
    /// Secret access key.
    pub secret_access_key: Option<String>,
    /// Session token of temporary credentials (only with an access key).
    pub session_token: Option<String>,
    /// Path-style requests (`true`) or virtual-hosted style (`false`).
    pub path_style: Option<bool>,
}

impl std::fmt::Debug for S3Request {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("S3Request")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redact(&self.secret_access_key))
            .field("session_token", &redact(&self.session_token))
            .field("path_style", &self.path_style)
            .finish()
    }
}

impl S3Request {
    /// The settings of a local-API request; `Ok(None)` when it gives none. An access key id
    /// without its secret (or the other way round), or a session token without them, is an
    /// error.
    pub fn from_proto(p: &wire::proto::dfdaemon::ObjectStorage) -> Result<Option<Self>, String> {
        let some = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let r = Self {
            endpoint: some(&p.endpoint),
            region: some(&p.region),
            access_key_id: some(&p.access_key_id),
            secret_access_key: some(&p.secret_access_key),
            session_token: some(&p.session_token),
            path_style: p.path_style,
        };
        r.check()?;
        Ok((r != Self::default()).then_some(r))
    }

    /// The local-API message carrying these settings.
    pub fn to_proto(&self) -> wire::proto::dfdaemon::ObjectStorage {
        let s = |v: &Option<String>| v.clone().unwrap_or_default();
        wire::proto::dfdaemon::ObjectStorage {
            endpoint: s(&self.endpoint),
            region: s(&self.region),
            access_key_id: s(&self.access_key_id),
            secret_access_key: s(&self.secret_access_key),
            session_token: s(&self.session_token),
            path_style: self.path_style,
        }
    }

    /// Whether the credentials are complete (an access key id and its secret together; a
    /// session token only with them).
    pub fn check(&self) -> Result<(), String> {
        match (&self.access_key_id, &self.secret_access_key) {
            (Some(_), None) => Err("an access key id needs its secret access key".into()),
            (None, Some(_)) => Err("a secret access key needs its access key id".into()),
            (None, None) if self.session_token.is_some() => {
                Err("a session token needs an access key id and secret access key".into())
            }
            _ => Ok(()),
        }
    }

    /// Whether these settings carry credentials (then the daemon's are not used).
    pub fn has_credentials(&self) -> bool {
        self.access_key_id.is_some()
    }

    /// `base` with these settings over it: each given value replaces the daemon's; the
    /// credentials replace the daemon's as a whole (key id, secret and token).
    pub fn apply(&self, base: &S3Config) -> S3Config {
        let pick = |v: &Option<String>, b: &str| v.clone().unwrap_or_else(|| b.to_string());
        let mut out = S3Config {
            endpoint: pick(&self.endpoint, &base.endpoint),
            region: pick(&self.region, &base.region),
            path_style: self.path_style.unwrap_or(base.path_style),
            ..base.clone()
        };
        if self.has_credentials() {
            out.access_key_id = pick(&self.access_key_id, "");
            out.secret_access_key = pick(&self.secret_access_key, "");
            out.session_token = pick(&self.session_token, "");
        }
        out
    }
}

/// Where the credentials of a failed request came from, for the error's hint.
fn credentials_hint(req: Option<&S3Request>) -> &'static str {
    if req.is_some_and(S3Request::has_credentials) {
        "the credentials given with the request (dfget --storage-access-key-id / --storage-secret-access-key)"
    } else {
        "the credentials: origin.s3 in dfdaemon's config, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY"
    }
}

/// Why an object-storage request failed, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The object (or bucket) does not exist.
    #[error("{0}: no such object in the object store (404)")]
    NotFound(String),
    /// The store refused the credentials or the request.
    #[error("{url}: access denied by the object store ({status}; check {hint}): {detail}")]
    Denied {
        /// The object's URL.
        url: String,
        /// `403 Forbidden` or `401 Unauthorized`.
        status: reqwest::StatusCode,
        /// Which credentials to check.
        hint: &'static str,
        /// The store's own words.
        detail: String,
    },
    /// Bad settings (endpoint, CA files).
    #[error("object store settings: {0}")]
    Config(String),
    /// Anything else (network, a 5xx): worth a retry.
    #[error("{0}")]
    Other(String),
}

impl S3Error {
    /// Whether retrying could help.
    pub fn retryable(&self) -> bool {
        matches!(self, S3Error::Other(_))
    }

    fn from_store(url: &str, req: Option<&S3Request>, e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => S3Error::NotFound(url.to_string()),
            object_store::Error::PermissionDenied { source, .. } => S3Error::Denied {
                url: url.to_string(),
                status: reqwest::StatusCode::FORBIDDEN,
                hint: credentials_hint(req),
                detail: store_detail(&*source),
            },
            object_store::Error::Unauthenticated { source, .. } => S3Error::Denied {
                url: url.to_string(),
                status: reqwest::StatusCode::UNAUTHORIZED,
                hint: credentials_hint(req),
                detail: store_detail(&*source),
            },
            other => S3Error::Other(format!("{url}: {}", crate::trust::describe(&other))),
        }
    }
}

/// The S3 error code in an error body (`<Code>SignatureDoesNotMatch</Code>`), else the text.
fn store_detail(e: &(dyn std::error::Error + 'static)) -> String {
    let text = crate::trust::describe(e);
    match (text.find("<Code>"), text.find("</Code>")) {
        (Some(a), Some(b)) if a + 6 < b => text[a + 6..b].to_string(),
        _ => text,
    }
}

/// An S3 client for `bucket` with `req`'s settings over `cfg`'s (environment for what they
/// leave unset; no credentials from the environment when `req` gives some) and `trust`'s
/// certificates.
pub fn client(
    cfg: &S3Config,
    req: Option<&S3Request>,
    trust: &OriginConfig,
    bucket: &str,
    connect_timeout: Duration,
) -> Result<AmazonS3, S3Error> {
    let (mut b, cfg) = match req {
        Some(r) if r.has_credentials() => (builder_from_env_without_credentials(), r.apply(cfg)),
        Some(r) => (AmazonS3Builder::from_env(), r.apply(cfg)),
        None => (AmazonS3Builder::from_env(), cfg.clone()),
    };
    b = b.with_bucket_name(bucket);
    if !cfg.endpoint.is_empty() {
        b = b.with_endpoint(&cfg.endpoint);
    }
    if !cfg.region.is_empty() {
        b = b.with_region(&cfg.region);
    }
    if !cfg.access_key_id.is_empty() {
        b = b.with_access_key_id(&cfg.access_key_id);
    }
    if !cfg.secret_access_key.is_empty() {
        b = b.with_secret_access_key(&cfg.secret_access_key);
    }
    if !cfg.session_token.is_empty() {
        b = b.with_token(&cfg.session_token);
    }
    b = b.with_virtual_hosted_style_request(!cfg.path_style);
    let mut opts = ClientOptions::new()
        .with_connect_timeout(connect_timeout)
        .with_timeout_disabled()
        .with_allow_invalid_certificates(trust.insecure_skip_verify);
    if cfg.endpoint.starts_with("http://") {
        opts = opts.with_allow_http(true);
    }
    for path in &trust.ca_certs {
        let pem = std::fs::read(path).map_err(|e| {
            S3Error::Config(format!("origin.ca_certs: reading {}: {e}", path.display()))
        })?;
        let certs = object_store::Certificate::from_pem_bundle(&pem)
            .map_err(|e| S3Error::Config(format!("origin.ca_certs: {}: {e}", path.display())))?;
        for c in certs {
            opts = opts.with_root_certificate(c);
        }
    }
    b.with_client_options(opts)
        .with_retry(RetryConfig {
            max_retries: 0,
            ..RetryConfig::default()
        })
        .build()
        .map_err(|e| S3Error::Config(e.to_string()))
}

/// What [`AmazonS3Builder::from_env`] takes from the `AWS_*` environment, minus the
/// credentials (access key, secret, session token, credential files and roles): for a
/// request that brings its own.
fn builder_from_env_without_credentials() -> AmazonS3Builder {
    let mut b = AmazonS3Builder::new();
    for (k, v) in std::env::vars_os() {
        let (Some(k), Some(v)) = (k.to_str(), v.to_str()) else {
            continue;
        };
        if !k.starts_with("AWS_") {
            continue;
        }
        let Ok(key) = k.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() else {
            continue;
        };
        let credential = matches!(
            key,
            AmazonS3ConfigKey::AccessKeyId
                | AmazonS3ConfigKey::SecretAccessKey
                | AmazonS3ConfigKey::Token
                | AmazonS3ConfigKey::ContainerCredentialsRelativeUri
                | AmazonS3ConfigKey::ContainerCredentialsFullUri
                | AmazonS3ConfigKey::ContainerAuthorizationTokenFile
                | AmazonS3ConfigKey::WebIdentityTokenFile
                | AmazonS3ConfigKey::RoleArn
                | AmazonS3ConfigKey::RoleSessionName
                | AmazonS3ConfigKey::StsEndpoint
                | AmazonS3ConfigKey::SkipSignature
        );
        if !credential {
            b = b.with_config(key, v);
        }
    }
    b
}

/// Reads `url` from byte `start` to `end` (exclusive; `None`: to the end) with `req`'s
/// settings over `cfg`'s. A read from 0 to the end is one plain `GET` (it also works for an
/// empty object); any other is a ranged `GET` (`Range: bytes=start-end`).
pub async fn open(
    cfg: &S3Config,
    req: Option<&S3Request>,
    trust: &OriginConfig,
    connect_timeout: Duration,
    url: &str,
    start: u64,
    end: Option<u64>,
) -> Result<Opened, S3Error> {
    let u = parse(url, false).map_err(S3Error::Config)?;
    let store = client(cfg, req, trust, &u.bucket, connect_timeout)?;
    let range = match (start, end) {
        (0, None) => None,
        (s, None) => Some(GetRange::Offset(s)),
        (s, Some(e)) => Some(GetRange::Bounded(s..e)),
    };
    let opts = GetOptions {
        range,
        ..GetOptions::default()
    };
    let res = store
        .get_opts(&ObjectPath::from(u.key.as_str()), opts)
        .await
        .map_err(|e| S3Error::from_store(url, req, e))?;
    let total = res.meta.size;
    let first = res.range.start;
    let url = url.to_string();
    let body = res
        .into_stream()
        .map(move |r| r.map_err(|e| format!("{url}: {}", crate::trust::describe(&e))))
        .boxed();
    Ok(Opened {
        total,
        start: first,
        body,
    })
}

/// One object of a listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// Its key.
    pub key: String,
    /// Its size.
    pub size: u64,
}

/// Every object whose key starts with the prefix of `url` (`s3://bucket/prefix/`), sorted by
/// key, with `req`'s settings over `cfg`'s.
pub async fn list(
    cfg: &S3Config,
    req: Option<&S3Request>,
    trust: &OriginConfig,
    connect_timeout: Duration,
    url: &str,
) -> Result<Vec<Listed>, S3Error> {
    let u = parse(url, true).map_err(S3Error::Config)?;
    let store = client(cfg, req, trust, &u.bucket, connect_timeout)?;
    let prefix = u.key.trim_end_matches('/');
    let prefix = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
    let mut stream = store.list(prefix.as_ref());
    let mut out = Vec::new();
    while let Some(m) = stream.next().await {
        let m = m.map_err(|e| S3Error::from_store(url, req, e))?;
        out.push(Listed {
            key: m.location.to_string(),
            size: m.size,
        });
    }
    out.sort_by(|a, b| a.key.cmp(&b.key));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_s3_urls() {
        assert_eq!(
            parse("s3://b/dir/k.bin", false),
            Ok(S3Url {
                bucket: "b".into(),
                key: "dir/k.bin".into()
            })
        );
        assert!(parse("s3://b", false).is_err());
        assert!(parse("s3://b/", true).is_ok());
        assert!(parse("s3:///k", false).is_err());
        assert!(parse("s3://b/k?x=1", false).is_err());
        assert!(parse("http://b/k", false).is_err());
    }

    fn daemon_cfg() -> S3Config {
        S3Config {
            endpoint: "http://daemon:9000".into(),
            region: "eu-west-1".into(),
            access_key_id: "daemon-key".into(),
            secret_access_key: "daemon-secret".into(),
            session_token: "daemon-token".into(),
            path_style: true,
        }
    }

    #[test]
    fn request_settings_replace_the_daemons_and_credentials_go_as_a_whole() {
        let req = S3Request {
            access_key_id: Some("user-key".into()),
            secret_access_key: Some("user-secret".into()),
            path_style: Some(false),
            ..S3Request::default()
        };
        let c = req.apply(&daemon_cfg());
        assert_eq!(c.endpoint, "http://daemon:9000", "unset: the daemon's");
        assert_eq!(c.region, "eu-west-1");
        assert_eq!(
            (&*c.access_key_id, &*c.secret_access_key, &*c.session_token),
            ("user-key", "user-secret", ""),
            "the daemon's session token is not mixed with the request's key"
        );
        assert!(!c.path_style);

        let endpoint_only = S3Request {
            endpoint: Some("http://other:9000".into()),
            ..S3Request::default()
        };
        let c = endpoint_only.apply(&daemon_cfg());
        assert_eq!(c.endpoint, "http://other:9000");
        assert_eq!(
            (&*c.access_key_id, &*c.session_token),
            ("daemon-key", "daemon-token"),
            "no credentials in the request: the daemon's"
        );
        assert!(c.path_style);
    }

    #[test]
    fn request_settings_from_the_local_api_are_checked_and_round_trip() {
        use wire::proto::dfdaemon::ObjectStorage;
        assert_eq!(S3Request::from_proto(&ObjectStorage::default()), Ok(None));
        let p = ObjectStorage {
            endpoint: "http://127.0.0.1:9000".into(),
            access_key_id: "k".into(),
            secret_access_key: "s".into(),
            path_style: Some(true),
            ..ObjectStorage::default()
        };
        let r = S3Request::from_proto(&p).expect("valid").expect("some");
        assert_eq!(r.region, None);
        assert_eq!(r.to_proto(), p);
        for (bad, says) in [
            (
                ObjectStorage {
                    access_key_id: "k".into(),
                    ..ObjectStorage::default()
                },
                "needs its secret",
            ),
            (
                ObjectStorage {
                    session_token: "t".into(),
                    ..ObjectStorage::default()
                },
                "session token needs",
            ),
        ] {
            let e = S3Request::from_proto(&bad).expect_err("incomplete credentials");
            assert!(e.contains(says), "{e}");
        }
    }

    #[test]
    fn debug_never_shows_a_secret() {
        let req = S3Request {
            access_key_id: Some("user-key".into()),
            secret_access_key: Some("user-secret".into()),
            session_token: Some("user-token".into()),
            ..S3Request::default()
        };
        let texts = [
            format!("{req:?}"),
            format!("{:?}", req.to_proto()),
            format!("{:?}", daemon_cfg()),
            format!("{:?}", req.apply(&daemon_cfg())),
        ];
        for t in texts {
            for secret in ["user-secret", "user-token", "daemon-secret", "daemon-token"] {
                assert!(!t.contains(secret), "{t}");
            }
            assert!(t.contains("<redacted>"), "{t}");
        }
    }

    #[test]
    fn the_denied_error_names_the_credentials_to_check() {
        let req = S3Request {
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            ..S3Request::default()
        };
        assert!(credentials_hint(Some(&req)).contains("--storage-access-key-id"));
        assert!(credentials_hint(None).contains("origin.s3"));
        let endpoint_only = S3Request {
            endpoint: Some("http://e".into()),
            ..S3Request::default()
        };
        assert!(credentials_hint(Some(&endpoint_only)).contains("origin.s3"));
    }

    #[test]
    fn the_s3_error_code_is_picked_out_of_the_body() {
        let e = std::io::Error::other(
            "Client error with status 403 Forbidden: <Error><Code>InvalidAccessKeyId</Code></Error>",
        );
        assert_eq!(store_detail(&e), "InvalidAccessKeyId");
    }
}
