//! HTTP helpers of the proxy: the upstream URL, the blob digest in a path, which headers
//! pass through, and registry-style JSON errors.

use http_body_util::BodyExt as _;
use http_body_util::Full;
use hyper::body::Bytes;
use hyper::header::{self, HeaderMap, HeaderName, HeaderValue};
use hyper::{Method, Response, StatusCode};

use super::{ProxyBody, REGISTRY_HEADER};

/// Parses an upstream registry URL (`http` or `https`, no query).
pub(super) fn parse_upstream(s: &str) -> Result<url::Url, String> {
    let u = url::Url::parse(s.trim()).map_err(|e| format!("{s:?}: {e}"))?;
    match u.scheme() {
        "http" | "https" if u.host_str().is_some() => Ok(u),
        _ => Err(format!(
            "{s:?} must be an http:// or https:// URL with a host"
        )),
    }
}

/// The `sha256:<64 hex>` digest in a blob path (`/v2/<name>/blobs/sha256:<hex>`,
/// [`wire::task::blob_path_digest`]), as canonical text and bytes.
pub fn blob_digest(path: &str) -> Option<(String, [u8; 32])> {
    let text = wire::task::blob_path_digest(path)?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(text.strip_prefix("sha256:")?, &mut out).ok()?;
    Some((text, out))
}

/// Headers that describe one connection, not the request (RFC 9110 §7.6.1).
pub(super) fn hop_by_hop(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
    )
}

/// Request headers passed to the upstream (`Host` is the upstream's own).
pub(super) fn forwardable(name: &HeaderName) -> bool {
    !hop_by_hop(name) && *name != header::HOST && name.as_str() != REGISTRY_HEADER
}

/// Whether a request has no body to forward.
pub(super) fn body_less(method: &Method, headers: &HeaderMap) -> bool {
    (*method == Method::GET || *method == Method::HEAD)
        && !headers.contains_key(header::CONTENT_LENGTH)
        && !headers.contains_key(header::TRANSFER_ENCODING)
}

/// A registry-style JSON error (`{"errors":[{"code":…,"message":…}]}`).
pub(super) fn error_response(status: StatusCode, message: &str) -> Response<ProxyBody> {
    let code = match status {
        StatusCode::BAD_REQUEST => "UNSUPPORTED",
        StatusCode::RANGE_NOT_SATISFIABLE => "BLOB_UNKNOWN",
        _ => "UNAVAILABLE",
    };
    let body = format!(
        "{{\"errors\":[{{\"code\":\"{code}\",\"message\":{}}}]}}\n",
        json_string(message)
    );
    let mut r = Response::new(
        Full::new(Bytes::from(body))
            .map_err(|never| match never {})
            .boxed(),
    );
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    r
}

/// `s` as a JSON string literal.
fn json_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_in_paths() {
        let hex64 = "ab".repeat(32);
        let (text, bytes) =
            blob_digest(&format!("/v2/library/alpine/blobs/sha256:{hex64}")).expect("digest");
        assert_eq!(text, format!("sha256:{hex64}"));
        assert_eq!(bytes, [0xab; 32]);
        assert!(blob_digest("/v2/library/alpine/blobs/sha256:abc").is_none());
        assert!(blob_digest("/v2/library/alpine/manifests/latest").is_none());
        assert!(blob_digest(&format!("/v2/x/blobs/sha512:{hex64}")).is_none());
    }

    #[test]
    fn upstreams() {
        assert!(parse_upstream("https://registry.example.com").is_ok());
        assert!(parse_upstream("http://127.0.0.1:5000").is_ok());
        assert!(parse_upstream("ftp://x").is_err());
        assert!(parse_upstream("registry.example.com").is_err());
    }

    #[test]
    fn json_errors_escape() {
        assert_eq!(json_string("a\"b\\c\n"), "\"a\\\"b\\\\c\\u000a\"");
    }
}
