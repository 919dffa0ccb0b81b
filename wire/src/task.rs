//! Task ids: one id per distinct content, shared by every peer that asks for it.
//!
//! # The task identity rule
//!
//! [`TaskId::for_download`] is the one rule every path uses (dfget, the registry mirror,
//! preheat through the scheduler; `dfcache` through [`TaskId::from_cache_id`], which agrees
//! with it):
//!
//! 1. **Content-addressed data** — data *named* by its sha256 digest: a registry blob URL
//!    (`…/v2/<name>/blobs/sha256:<hex>`, see [`blob_url_digest`]; what the registry mirror
//!    fetches, what an image preheat resolves each layer and the config to, what `dfget` of a
//!    blob URL asks for) and a `dfcache` content id. Unless a piece length is forced, its id
//!    is [`TaskId::from_cache_id`]`(digest, tag, application)`, which without tag and
//!    application is [`TaskId::from_content_digest`]`(digest)`. The URL does not count: one
//!    blob from any registry, repository or mirror, preheated, pulled, fetched with `dfget`
//!    or `dfcache`, is one task.
//! 2. **Everything else** (any other URL, or a forced piece length, which makes a task of its
//!    own layout): [`TaskId::from_url`].
//!
//! A digest given *with* a request (`dfget --digest`, a file preheat's `digest`) checks the
//! content but never changes which task it is: giving it or not must not split one URL into
//! two tasks (a preheat without a digest is found by a `dfget --digest` of the same URL, and
//! the other way round), and it is how Dragonfly's `--digest` behaves. For a blob URL it must
//! equal the URL's digest ([`TaskIdError::DigestMismatch`] otherwise).
//!
//! Whoever fetches a content-addressed task (or a preheat target with a digest) from its
//! origin checks the bytes against the digest (the daemon does, see `controlplane`), so such
//! a task is never completed with other content; a client's own digest is checked when the
//! file is delivered to it ([`content_digest`] is the digest to check a download against).

use sha2::{Digest, Sha256};
use std::fmt;

/// Query parameters removed before hashing a URL by default (signatures and expiry times of
/// pre-signed URLs change per request but not the content), as in Dragonfly.
pub const DEFAULT_FILTERED_QUERY_PARAMS: &[&str] = &["Expires", "Signature", "ns"];

/// A task id: 32 bytes (a sha256), shown as 64 lowercase hex characters.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TaskId(pub [u8; 32]);

/// What identifies a task besides its URL.
#[derive(Debug, Default, Clone)]
pub struct TaskIdOptions<'a> {
    /// User tag: different tags make different tasks for the same URL.
    pub tag: &'a str,
    /// Application name, hashed like the tag.
    pub application: &'a str,
    /// Piece length, when forced by the user (0 when derived).
    pub piece_length: u64,
    /// Query parameters to drop from the URL before hashing.
    pub filtered_query_params: &'a [String],
}

/// Why [`TaskId::for_download`] found no id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskIdError {
    /// The URL does not parse.
    #[error("bad url: {0}")]
    Url(#[from] url::ParseError),
    /// The given digest and the digest in the blob URL differ.
    #[error("digest {given} contradicts the blob URL's digest {in_url}")]
    DigestMismatch {
        /// The digest given with the request.
        given: String,
        /// The digest in the URL path.
        in_url: String,
    },
}

/// The canonical form of a sha256 content digest: `sha256:` and 64 lowercase hex characters.
/// `None` for anything else (other algorithms, wrong length, not hex).
pub fn sha256_digest(digest: &str) -> Option<String> {
    let hexpart = digest.strip_prefix("sha256:")?;
    if hexpart.len() != 64 || !hexpart.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    Some(format!("sha256:{}", hexpart.to_ascii_lowercase()))
}

/// The content digest named by a registry blob path (`/v2/<name>/blobs/sha256:<hex>`, the
/// OCI distribution API, possibly below a path prefix of the registry), in canonical form;
/// `None` for any other path.
pub fn blob_path_digest(path: &str) -> Option<String> {
    let v2 = path.find("/v2/")?;
    let rest = &path[v2 + "/v2/".len()..];
    let i = rest.find("/blobs/")?;
    if i == 0 {
        return None; // no repository name
    }
    let last = &rest[i + "/blobs/".len()..];
    if last.contains('/') {
        return None;
    }
    sha256_digest(last)
}

/// The content digest of a registry blob URL (`http(s)://host/v2/<name>/blobs/sha256:<hex>`,
/// query ignored), in canonical form; `None` for any other URL.
pub fn blob_url_digest(url: &str) -> Option<String> {
    let parsed = url::Url::parse(url).ok()?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return None;
    }
    blob_path_digest(parsed.path())
}

/// Error for a task id string that is not 64 hex characters.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("task id must be 64 hex characters")]
pub struct ParseTaskIdError;

impl TaskId {
    /// The id of `url` with `opts`: sha256 over the URL without the filtered query parameters,
    /// the tag, the application and the forced piece length. Returns an error for a URL that
    /// does not parse.
    pub fn from_url(url: &str, opts: &TaskIdOptions<'_>) -> Result<Self, url::ParseError> {
        let mut parsed = url::Url::parse(url)?;
        let filtered: Vec<&str> = if opts.filtered_query_params.is_empty() {
            DEFAULT_FILTERED_QUERY_PARAMS.to_vec()
        } else {
            opts.filtered_query_params
                .iter()
                .map(String::as_str)
                .collect()
        };
        if parsed.query().is_some() {
            let kept: Vec<(String, String)> = parsed
                .query_pairs()
                .filter(|(k, _)| !filtered.contains(&k.as_ref()))
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            if kept.is_empty() {
                parsed.set_query(None);
            } else {
                parsed.query_pairs_mut().clear().extend_pairs(kept);
            }
        }
        parsed.set_fragment(None);
        let mut h = Sha256::new();
        h.update(parsed.as_str().as_bytes());
        h.update([0]);
        h.update(opts.tag.as_bytes());
        h.update([0]);
        h.update(opts.application.as_bytes());
        h.update([0]);
        if opts.piece_length != 0 {
            h.update(opts.piece_length.to_be_bytes());
        }
        Ok(Self(h.finalize().into()))
    }

    /// The task id of a download of `url`, by the rule in the
    /// [module documentation](self): the content digest's id for a registry blob URL (unless
    /// a piece length is forced), the URL's id otherwise. `digest` is the digest given with
    /// the request (empty: none): it never changes the id, but contradicting a blob URL's
    /// digest is an error.
    pub fn for_download(
        url: &str,
        digest: &str,
        opts: &TaskIdOptions<'_>,
    ) -> Result<Self, TaskIdError> {
        content_digest(url, digest)?;
        match blob_url_digest(url) {
            Some(d) if opts.piece_length == 0 => {
                Ok(Self::from_cache_id(&d, opts.tag, opts.application))
            }
            _ => Ok(Self::from_url(url, opts)?),
        }
    }

    /// The id of a content digest such as `sha256:<hex>`: the same blob from two URLs is one
    /// task.
    pub fn from_content_digest(digest: &str) -> Self {
        let mut h = Sha256::new();
        h.update(b"content:");
        h.update(digest.as_bytes());
        Self(h.finalize().into())
    }

    /// The id of a dfcache entry: content id `cid` (usually `sha256:<hex>` of the file) with a
    /// tag and an application. Without tag and application it is
    /// [`TaskId::from_content_digest`] of `cid`, so an imported blob and the same blob
    /// fetched by digest are one task.
    pub fn from_cache_id(cid: &str, tag: &str, application: &str) -> Self {
        if tag.is_empty() && application.is_empty() {
            return Self::from_content_digest(cid);
        }
        let mut h = Sha256::new();
        h.update(b"cache:");
        h.update(cid.as_bytes());
        h.update([0]);
        h.update(tag.as_bytes());
        h.update([0]);
        h.update(application.as_bytes());
        Self(h.finalize().into())
    }

    /// Parses the 64-hex-character form.
    pub fn parse(s: &str) -> Result<Self, ParseTaskIdError> {
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| ParseTaskIdError)?;
        Ok(Self(out))
    }

    /// The 64-hex-character form.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

/// The canonical sha256 digest a download of `url` is known to have, to check its content
/// against: `digest` when given (and, for a blob URL, equal to the URL's), else the blob
/// URL's; `None` when neither names a sha256 digest. The URL must parse.
pub fn content_digest(url: &str, digest: &str) -> Result<Option<String>, TaskIdError> {
    url::Url::parse(url)?;
    let in_url = blob_url_digest(url);
    let given = sha256_digest(digest.trim());
    match (given, in_url) {
        (Some(g), Some(u)) if g != u => Err(TaskIdError::DigestMismatch {
            given: g,
            in_url: u,
        }),
        (Some(g), _) => Ok(Some(g)),
        (None, u) => Ok(u),
    }
}

impl fmt::Display for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl fmt::Debug for TaskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "TaskId({})", &self.to_hex()[..12])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn filtered_params_do_not_change_the_id() {
        let o = TaskIdOptions::default();
        let a = TaskId::from_url("http://h/f?Expires=1&Signature=x&a=b", &o).expect("url");
        let b = TaskId::from_url("http://h/f?a=b&Expires=2", &o).expect("url");
        let c = TaskId::from_url("http://h/f?a=c", &o).expect("url");
        assert_eq!(a, b);
        assert_ne!(a, c);
    }

    #[test]
    fn tag_and_piece_length_change_the_id() {
        let base = TaskId::from_url("http://h/f", &TaskIdOptions::default()).expect("url");
        let tagged = TaskId::from_url(
            "http://h/f",
            &TaskIdOptions {
                tag: "t",
                ..Default::default()
            },
        )
        .expect("url");
        let sized = TaskId::from_url(
            "http://h/f",
            &TaskIdOptions {
                piece_length: 1 << 20,
                ..Default::default()
            },
        )
        .expect("url");
        assert_ne!(base, tagged);
        assert_ne!(base, sized);
    }

    #[test]
    fn hex_round_trip() {
        let id = TaskId::from_content_digest("sha256:abc");
        assert_eq!(TaskId::parse(&id.to_hex()), Ok(id));
        assert_eq!(TaskId::parse("zz"), Err(ParseTaskIdError));
    }

    #[test]
    fn cache_ids() {
        let plain = TaskId::from_cache_id("sha256:ab", "", "");
        assert_eq!(plain, TaskId::from_content_digest("sha256:ab"));
        assert_ne!(plain, TaskId::from_cache_id("sha256:ab", "t", ""));
        assert_ne!(
            TaskId::from_cache_id("sha256:ab", "t", ""),
            TaskId::from_cache_id("sha256:ab", "", "t")
        );
    }

    const HEX: &str = "599d0ad2d0b2a4c8e3b7c0e8a8b7e3c2d1f0a9b8c7d6e5f4a3b2c1d0e9f8a7b6";

    #[test]
    fn blob_urls_name_their_digest() {
        let d = format!("sha256:{HEX}");
        let upper = format!("sha256:{}", HEX.to_ascii_uppercase());
        for url in [
            format!("http://127.0.0.1:5000/v2/test/img/blobs/{d}"),
            format!("https://r.example.com/v2/a/b/c/blobs/{d}?ns=docker.io"),
            format!("https://r.example.com/v2/a/blobs/{upper}"),
            format!("https://r.example.com/prefix/v2/a/blobs/{d}"),
        ] {
            assert_eq!(blob_url_digest(&url), Some(d.clone()), "{url}");
        }
        for url in [
            format!("http://h/v2/test/img/manifests/{d}"),
            format!("http://h/v2/blobs/{d}"),
            format!("http://h/v2/x/blobs/{d}/extra"),
            format!("http://h/v2/x/blobs/sha512:{HEX}{HEX}"),
            "http://h/v2/x/blobs/sha256:abc".to_string(),
            format!("http://h/files/blobs/{d}"),
            format!("ftp://h/v2/x/blobs/{d}"),
        ] {
            assert_eq!(blob_url_digest(&url), None, "{url}");
        }
    }

    /// The rule: every path to the same blob makes the same id.
    #[test]
    fn content_addressed_downloads_share_one_id() {
        let d = format!("sha256:{HEX}");
        let want = TaskId::from_content_digest(&d);
        let o = TaskIdOptions::default();
        // The registry mirror and a dfget of the blob URL (any registry, any repository).
        let mirror = TaskId::for_download(
            &format!("http://127.0.0.1:5000/v2/test/img/blobs/{d}"),
            "",
            &o,
        );
        let other_repo = TaskId::for_download(
            &format!("https://mirror.example/v2/other/blobs/{d}"),
            "",
            &o,
        );
        // An image preheat (blob URL and the layer's digest), also in upper case.
        let preheat = TaskId::for_download(&format!("http://r:1/v2/test/img/blobs/{d}"), &d, &o);
        let upper = TaskId::for_download(
            &format!("http://r:1/v2/test/img/blobs/{d}"),
            &format!("sha256:{}", HEX.to_ascii_uppercase()),
            &o,
        );
        // dfcache import/export of the same bytes (its default id is the file's digest).
        let cache = TaskId::from_cache_id(&d, "", "");
        for got in [mirror, other_repo, preheat, upper] {
            assert_eq!(got, Ok(want));
        }
        assert_eq!(cache, want);
    }

    /// `dfget --digest` and a file preheat's digest check content; they do not make another
    /// task than the same URL without a digest.
    #[test]
    fn a_given_digest_does_not_change_the_id_of_a_plain_url() {
        let d = format!("sha256:{HEX}");
        let o = TaskIdOptions::default();
        let url = "http://origin/layer.tar.gz";
        let plain = TaskId::from_url(url, &o).expect("url");
        assert_eq!(TaskId::for_download(url, "", &o), Ok(plain));
        assert_eq!(TaskId::for_download(url, &d, &o), Ok(plain));
        assert_eq!(content_digest(url, &d), Ok(Some(d.clone())));
        assert_eq!(content_digest(url, ""), Ok(None));
    }

    #[test]
    fn tag_and_application_separate_content_ids_like_dfcache() {
        let d = format!("sha256:{HEX}");
        let o = TaskIdOptions {
            tag: "t",
            application: "a",
            ..Default::default()
        };
        let got = TaskId::for_download(&format!("http://r/v2/x/blobs/{d}"), "", &o).expect("id");
        assert_eq!(got, TaskId::from_cache_id(&d, "t", "a"));
        assert_ne!(got, TaskId::from_content_digest(&d));
    }

    #[test]
    fn other_urls_and_forced_piece_lengths_are_identified_by_url() {
        let o = TaskIdOptions::default();
        let url = "http://origin/f?Signature=x";
        let by_url = TaskId::from_url(url, &o).expect("url");
        assert_eq!(TaskId::for_download(url, "", &o), Ok(by_url));
        assert_eq!(TaskId::for_download(url, "md5:abc", &o), Ok(by_url));
        assert_eq!(
            TaskId::for_download(&format!("{url}&x=sha256:{HEX}"), "", &o),
            TaskId::from_url(&format!("{url}&x=sha256:{HEX}"), &o).map_err(TaskIdError::from)
        );
        let sized = TaskIdOptions {
            piece_length: 1 << 20,
            ..Default::default()
        };
        let blob = format!("http://r/v2/x/blobs/sha256:{HEX}");
        assert_eq!(
            TaskId::for_download(&blob, "", &sized),
            TaskId::from_url(&blob, &sized).map_err(TaskIdError::from)
        );
    }

    #[test]
    fn a_digest_contradicting_the_blob_url_is_an_error() {
        let other = format!("sha256:{}", "0".repeat(64));
        let got = TaskId::for_download(
            &format!("http://r/v2/x/blobs/sha256:{HEX}"),
            &other,
            &TaskIdOptions::default(),
        );
        assert!(matches!(got, Err(TaskIdError::DigestMismatch { .. })));
        assert!(TaskId::for_download("not a url", "", &TaskIdOptions::default()).is_err());
        assert!(TaskId::for_download("not a url", &other, &TaskIdOptions::default()).is_err());
    }

    #[test]
    fn bad_url_is_an_error() {
        assert!(TaskId::from_url("not a url", &TaskIdOptions::default()).is_err());
    }
}
