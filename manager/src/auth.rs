//! Bearer tokens for REST writes.
//!
//! Two sources, both accepted: `auth.bootstrap_token` from the config, and a token generated
//! at first start (when the database has none), printed once to the log, of which only the
//! sha256 is stored (setting `api_token_sha256`). Comparison is constant-time on the hashes.

use rand::RngCore as _;
use sha2::{Digest as _, Sha256};
use subtle::ConstantTimeEq as _;

use crate::store::{Store, StoreResult};

/// Settings key of the generated token's hash.
pub const TOKEN_HASH_KEY: &str = "api_token_sha256";

/// The tokens the REST API accepts for writes.
#[derive(Debug, Clone, Default)]
pub struct Auth {
    hashes: Vec<[u8; 32]>,
}

fn sha256(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// Hex sha256 of a token, as personal access tokens are stored.
pub fn token_sha256_hex(token: &str) -> String {
    hex::encode(sha256(token))
}

/// A new random personal access token (`dfp_` and 48 hex digits) and its hex sha256.
pub fn new_personal_token() -> (String, String) {
    let mut raw = [0u8; 24];
    rand::rng().fill_bytes(&mut raw);
    let token = format!("dfp_{}", hex::encode(raw));
    let hash = token_sha256_hex(&token);
    (token, hash)
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(value: Option<&str>) -> Option<&str> {
    let mut parts = value?.trim().splitn(2, ' ');
    match (parts.next(), parts.next()) {
        (Some(scheme), Some(token)) if scheme.eq_ignore_ascii_case("bearer") => {
            Some(token.trim()).filter(|t| !t.is_empty())
        }
        _ => None,
    }
}

impl Auth {
    /// Loads the accepted tokens; when the database holds no generated token yet, makes one
    /// and returns it in clear (the only time it is known) for the caller to print.
    pub async fn init(
        store: &dyn Store,
        bootstrap_token: &str,
    ) -> StoreResult<(Self, Option<String>)> {
        let mut hashes = Vec::new();
        if !bootstrap_token.is_empty() {
            hashes.push(sha256(bootstrap_token));
        }
        let mut generated = None;
        let stored = match store.get_setting(TOKEN_HASH_KEY).await? {
            Some(h) => Some(h),
            None if bootstrap_token.is_empty() => {
                let mut raw = [0u8; 24];
                rand::rng().fill_bytes(&mut raw);
                let token = format!("dfm_{}", hex::encode(raw));
                let hash = hex::encode(sha256(&token));
                if store.insert_setting(TOKEN_HASH_KEY, &hash).await? {
                    generated = Some(token);
                    Some(hash)
                } else {
                    // Another manager sharing the database won the race: use its token.
                    store.get_setting(TOKEN_HASH_KEY).await?
                }
            }
            None => None,
        };
        if let Some(h) = stored {
            let mut bytes = [0u8; 32];
            if hex::decode_to_slice(h.trim(), &mut bytes).is_ok() {
                hashes.push(bytes);
            } else {
                tracing::warn!("stored API token hash is malformed; ignoring it");
            }
        }
        Ok((Self { hashes }, generated))
    }

    /// An `Auth` accepting exactly these tokens (tests, embedding).
    pub fn with_tokens<'a>(tokens: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            hashes: tokens.into_iter().map(sha256).collect(),
        }
    }

    /// Whether `token` is accepted.
    pub fn check(&self, token: &str) -> bool {
        let h = sha256(token);
        let mut ok = subtle::Choice::from(0u8);
        for known in &self.hashes {
            ok |= known.ct_eq(&h);
        }
        bool::from(ok)
    }

    /// Whether an `Authorization` header value carries an accepted bearer token.
    pub fn check_header(&self, value: Option<&str>) -> bool {
        bearer(value).is_some_and(|t| self.check(t))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_forms() {
        let a = Auth::with_tokens(["s3cret"]);
        assert!(a.check_header(Some("Bearer s3cret")));
        assert!(a.check_header(Some("bearer  s3cret ")));
        assert!(!a.check_header(Some("Bearer nope")));
        assert!(!a.check_header(Some("Basic s3cret")));
        assert!(!a.check_header(Some("s3cret")));
        assert!(!a.check_header(None));
        assert!(!Auth::default().check("anything"));
    }
}
