//! Object storage back to source: `s3://bucket/key` URLs, through the `object_store` crate's
//! S3 client (see the crate README for why that crate).
//!
//! Settings come in one order: the `origin.s3` section of dfdaemon's config, else the usual
//! AWS environment variables (`AWS_ENDPOINT`, `AWS_REGION`, `AWS_ACCESS_KEY_ID`,
//! `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`, …), else the defaults (AWS, `us-east-1`).
//! The client trusts what the origin client trusts (`origin.ca_certs`, the system store,
//! `origin.insecure_skip_verify`). `object_store` does not retry here: the origin fetch has
//! its own resumption (`download.origin_retries`).

use crate::config::{OriginConfig, S3Config};
use crate::origin::Opened;
use futures::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
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

/// Why an object-storage request failed, in words a user can act on.
#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    /// The object (or bucket) does not exist.
    #[error("{0}: no such object in the object store (404)")]
    NotFound(String),
    /// The store refused the credentials or the request.
    #[error("{url}: access denied by the object store ({status}; check the credentials: origin.s3 in dfdaemon's config, or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY): {detail}")]
    Denied {
        /// The object's URL.
        url: String,
        /// `403 Forbidden` or `401 Unauthorized`.
        status: reqwest::StatusCode,
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

    fn from_store(url: &str, e: object_store::Error) -> Self {
        match e {
            object_store::Error::NotFound { .. } => S3Error::NotFound(url.to_string()),
            object_store::Error::PermissionDenied { source, .. } => S3Error::Denied {
                url: url.to_string(),
                status: reqwest::StatusCode::FORBIDDEN,
                detail: store_detail(&*source),
            },
            object_store::Error::Unauthenticated { source, .. } => S3Error::Denied {
                url: url.to_string(),
                status: reqwest::StatusCode::UNAUTHORIZED,
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

/// An S3 client for `bucket` with `cfg`'s settings (environment for what they leave unset)
/// and `trust`'s certificates.
pub fn client(
    cfg: &S3Config,
    trust: &OriginConfig,
    bucket: &str,
    connect_timeout: Duration,
) -> Result<AmazonS3, S3Error> {
    let mut b = AmazonS3Builder::from_env().with_bucket_name(bucket);
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

/// Reads `url` from byte `start` to `end` (exclusive; `None`: to the end). A read from 0 to
/// the end is one plain `GET` (it also works for an empty object); any other is a ranged
/// `GET` (`Range: bytes=start-end`).
pub async fn open(
    cfg: &S3Config,
    trust: &OriginConfig,
    connect_timeout: Duration,
    url: &str,
    start: u64,
    end: Option<u64>,
) -> Result<Opened, S3Error> {
    let u = parse(url, false).map_err(S3Error::Config)?;
    let store = client(cfg, trust, &u.bucket, connect_timeout)?;
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
        .map_err(|e| S3Error::from_store(url, e))?;
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
/// key.
pub async fn list(
    cfg: &S3Config,
    trust: &OriginConfig,
    connect_timeout: Duration,
    url: &str,
) -> Result<Vec<Listed>, S3Error> {
    let u = parse(url, true).map_err(S3Error::Config)?;
    let store = client(cfg, trust, &u.bucket, connect_timeout)?;
    let prefix = u.key.trim_end_matches('/');
    let prefix = (!prefix.is_empty()).then(|| ObjectPath::from(prefix));
    let mut stream = store.list(prefix.as_ref());
    let mut out = Vec::new();
    while let Some(m) = stream.next().await {
        let m = m.map_err(|e| S3Error::from_store(url, e))?;
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

    #[test]
    fn the_s3_error_code_is_picked_out_of_the_body() {
        let e = std::io::Error::other(
            "Client error with status 403 Forbidden: <Error><Code>InvalidAccessKeyId</Code></Error>",
        );
        assert_eq!(store_detail(&e), "InvalidAccessKeyId");
    }
}
