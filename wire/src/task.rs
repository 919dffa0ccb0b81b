//! Task ids: one id per distinct content, shared by every peer that asks for it.

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

    #[test]
    fn bad_url_is_an_error() {
        assert!(TaskId::from_url("not a url", &TaskIdOptions::default()).is_err());
    }
}
