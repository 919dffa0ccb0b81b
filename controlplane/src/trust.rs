//! Trust towards origins: the HTTP clients that fetch from origins and registries, built from
//! the `origin:` section (private CAs, the system store, the `insecure_skip_verify` escape
//! hatch), and error messages that say what a refused certificate means.
//!
//! reqwest's own `Display` of a failed request is `error sending request for url (…)`; the
//! reason (`invalid peer certificate: UnknownIssuer`) sits several `source()`s down, inside an
//! `io::Error` whose `source()` skips it. [`describe`] walks that chain and turns a
//! certificate refusal into a sentence naming the setting that fixes it.

use crate::config::OriginConfig;
use anyhow::Context as _;
use std::error::Error as StdError;
use std::path::PathBuf;

/// Adds the trust settings of `cfg` (plus `extra_ca` files and `extra_insecure`, the
/// registry proxy's own keys, named `extra_key` in errors) to `builder`.
///
/// Trusted: the built-in web roots, the operating system's store when
/// `cfg.system_ca_certs`, and every certificate in the PEM files of `cfg.ca_certs` and
/// `extra_ca`. A missing or unparsable file is an error naming it.
pub fn apply(
    mut builder: reqwest::ClientBuilder,
    cfg: &OriginConfig,
    extra_ca: &[PathBuf],
    extra_insecure: bool,
    extra_key: &str,
) -> anyhow::Result<reqwest::ClientBuilder> {
    builder = builder
        .tls_built_in_webpki_certs(true)
        .tls_built_in_native_certs(cfg.system_ca_certs);
    let files = cfg
        .ca_certs
        .iter()
        .map(|p| ("origin", p))
        .chain(extra_ca.iter().map(|p| (extra_key, p)));
    for (section, path) in files {
        for cert in load_pem(path).with_context(|| format!("{section}.ca_certs"))? {
            builder = builder.add_root_certificate(cert);
        }
    }
    if cfg.insecure_skip_verify || extra_insecure {
        builder = builder.danger_accept_invalid_certs(true);
    }
    Ok(builder)
}

/// The certificates of one PEM file (at least one).
pub fn load_pem(path: &std::path::Path) -> anyhow::Result<Vec<reqwest::Certificate>> {
    let pem = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let certs = reqwest::Certificate::from_pem_bundle(&pem)
        .with_context(|| format!("{} is not PEM", path.display()))?;
    if certs.is_empty() {
        anyhow::bail!("{}: no CERTIFICATE in the file", path.display());
    }
    Ok(certs)
}

/// Logs, loudly, that certificate checks are off (called once at start).
pub fn warn_if_insecure(cfg: &OriginConfig, what: &str) {
    if cfg.insecure_skip_verify {
        tracing::warn!(
            "{what}: insecure_skip_verify is on: origin TLS certificates are NOT verified; \
             anyone on the path can impersonate any origin. Use origin.ca_certs instead"
        );
    }
}

/// The TLS certificate error inside `err`'s chain, if the request failed because the
/// server's certificate was refused.
pub fn certificate_error(err: &(dyn StdError + 'static)) -> Option<rustls::CertificateError> {
    let mut cur: Option<&(dyn StdError + 'static)> = Some(err);
    while let Some(e) = cur {
        if let Some(rustls::Error::InvalidCertificate(c)) = e.downcast_ref::<rustls::Error>() {
            return Some(c.clone());
        }
        // `io::Error::source()` skips the error it wraps; look inside it.
        if let Some(io) = e.downcast_ref::<std::io::Error>() {
            if let Some(inner) = io.get_ref() {
                if let Some(rustls::Error::InvalidCertificate(c)) =
                    inner.downcast_ref::<rustls::Error>()
                {
                    return Some(c.clone());
                }
                if let Some(c) = certificate_error(inner) {
                    return Some(c);
                }
            }
        }
        cur = e.source();
    }
    None
}

/// `err` with every cause in its chain (`a: b: c`), and for a refused certificate the
/// setting that fixes it.
pub fn describe(err: &(dyn StdError + 'static)) -> String {
    if let Some(c) = certificate_error(err) {
        let what = match c {
            rustls::CertificateError::UnknownIssuer => {
                "the origin's TLS certificate is signed by an unknown authority \
                 (x509: certificate signed by unknown authority)"
                    .to_string()
            }
            rustls::CertificateError::NotValidForName
            | rustls::CertificateError::NotValidForNameContext { .. } => {
                "the origin's TLS certificate is not valid for its host name".to_string()
            }
            rustls::CertificateError::Expired | rustls::CertificateError::ExpiredContext { .. } => {
                "the origin's TLS certificate has expired".to_string()
            }
            other => format!("the origin's TLS certificate was refused ({other:?})"),
        };
        return format!(
            "{what}; trust its CA with origin.ca_certs in dfdaemon's config (or the system \
             store), or set origin.insecure_skip_verify: {}",
            chain(err)
        );
    }
    chain(err)
}

/// `err` and its causes joined with `: `, repeated messages left out.
fn chain(err: &(dyn StdError + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        let s = e.to_string();
        if !out.contains(&s) {
            out.push_str(": ");
            out.push_str(&s);
        }
        cur = e.source();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_unknown_issuer_inside_an_io_error_is_found_and_named() {
        let io = std::io::Error::other(rustls::Error::InvalidCertificate(
            rustls::CertificateError::UnknownIssuer,
        ));
        let outer = anyhow::Error::new(io).context("error sending request");
        let root: &(dyn StdError + 'static) = outer.as_ref();
        assert_eq!(
            certificate_error(root),
            Some(rustls::CertificateError::UnknownIssuer)
        );
        let text = describe(root);
        assert!(text.contains("unknown authority"), "{text}");
        assert!(text.contains("origin.ca_certs"), "{text}");
    }

    #[test]
    fn other_errors_keep_their_whole_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let outer = anyhow::Error::new(io).context("connecting");
        let root: &(dyn StdError + 'static) = outer.as_ref();
        assert_eq!(certificate_error(root), None);
        assert_eq!(describe(root), "connecting: refused");
    }

    #[test]
    fn a_file_without_certificates_is_refused_by_name() {
        let dir = tempfile::tempdir().expect("temp dir");
        let p = dir.path().join("empty.pem");
        std::fs::write(&p, "not a certificate\n").expect("write");
        let e = load_pem(&p).expect_err("no certificate");
        assert!(format!("{e:#}").contains("empty.pem"), "{e:#}");
    }
}
