//! The registry proxy's certificate authority for `CONNECT` interception: hosts named by
//! `proxy.hijack_hosts` get their TLS terminated by the proxy with a leaf certificate minted
//! here for the host the client asked for, signed by a CA the daemon generates once and
//! writes out (`<storage.dir>/proxy-ca.pem`) for clients to trust.
//!
//! The CA's key is kept beside it (`proxy-ca-key.pem`, mode 0600). On a later start the key
//! is read back and the CA is made again from it with the same name, so leaves minted after a
//! restart still chain to the certificate clients already trust; the file is not rewritten.
//!
//! Users who already distribute a CA to their clients (Dragonfly's `proxy.security.caCert` /
//! `caKey`) name its files with `proxy.ca_cert` and `proxy.ca_key`: leaves are then signed by
//! that CA and nothing is generated or written. At start the pair is checked: both files
//! readable, the certificate a CA (basic constraints `CA:TRUE`), the key (PKCS#8 PEM) the one
//! whose public half the certificate carries.

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use regex::Regex;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// Subject common name of the generated CA (fixed: a restart must make the same issuer).
const CA_NAME: &str = "Damselfly dfdaemon proxy CA";

/// The CA, the host rules, and the leaves minted so far.
pub struct ProxyCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    ca_der: Vec<u8>,
    hosts: Vec<Regex>,
    leaves: Mutex<HashMap<String, Arc<rustls::ServerConfig>>>,
    /// The CA certificate's file, for clients to trust.
    pub cert_path: PathBuf,
}

/// A user-supplied CA: `proxy.ca_cert` and `proxy.ca_key`.
#[derive(Debug, Clone, Copy)]
pub struct UserCa<'a> {
    /// PEM file of the CA certificate.
    pub cert: &'a Path,
    /// PEM file (PKCS#8) of its private key.
    pub key: &'a Path,
}

impl std::fmt::Debug for ProxyCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyCa")
            .field("cert_path", &self.cert_path)
            .field("hosts", &self.hosts)
            .finish_non_exhaustive()
    }
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut p = CertificateParams::new(Vec::<String>::new()).context("CA parameters")?;
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.distinguished_name.push(DnType::CommonName, CA_NAME);
    p.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    Ok(p)
}

impl ProxyCa {
    /// Loads (or, the first time, generates and writes) the CA in `dir`, or uses `user`'s CA
    /// when given; `hosts` are the `proxy.hijack_hosts` regexes.
    pub fn open(dir: &Path, hosts: &[String], user: Option<UserCa<'_>>) -> anyhow::Result<Self> {
        let hosts = hosts
            .iter()
            .map(|h| Regex::new(h).with_context(|| format!("proxy.hijack_hosts: {h:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
        if let Some(user) = user {
            return Self::from_user(user, hosts);
        }
        let cert_path = dir.join("proxy-ca.pem");
        let key_path = dir.join("proxy-ca-key.pem");
        let (key, fresh) = if key_path.exists() && cert_path.exists() {
            let pem = std::fs::read_to_string(&key_path)
                .with_context(|| format!("reading {}", key_path.display()))?;
            let key = KeyPair::from_pem(&pem)
                .with_context(|| format!("{}: not a private key", key_path.display()))?;
            (key, false)
        } else {
            (
                KeyPair::generate().context("generating the proxy CA key")?,
                true,
            )
        };
        let cert = ca_params()?
            .self_signed(&key)
            .context("signing the proxy CA")?;
        if fresh {
            write_private(&key_path, &key.serialize_pem())?;
            std::fs::write(&cert_path, cert.pem())
                .with_context(|| format!("writing {}", cert_path.display()))?;
            tracing::info!(
                "proxy: generated a CA for intercepted HTTPS hosts; clients must trust {}",
                cert_path.display()
            );
        }
        let ca_der = cert.der().to_vec();
        Ok(Self {
            cert,
            key,
            ca_der,
            hosts,
            leaves: Mutex::new(HashMap::new()),
            cert_path,
        })
    }

    /// Uses the CA in `user`'s files after checking that they belong together.
    fn from_user(user: UserCa<'_>, hosts: Vec<Regex>) -> anyhow::Result<Self> {
        let cert_pem = std::fs::read_to_string(user.cert)
            .with_context(|| format!("proxy.ca_cert: reading {}", user.cert.display()))?;
        let key_pem = std::fs::read_to_string(user.key)
            .with_context(|| format!("proxy.ca_key: reading {}", user.key.display()))?;
        let ca_der = x509_parser::pem::Pem::iter_from_buffer(cert_pem.as_bytes())
            .filter_map(Result::ok)
            .find(|p| p.label == "CERTIFICATE")
            .map(|p| p.contents)
            .with_context(|| {
                format!(
                    "proxy.ca_cert: {} holds no PEM certificate",
                    user.cert.display()
                )
            })?;
        let (_, x509) = x509_parser::parse_x509_certificate(&ca_der).map_err(|e| {
            anyhow::anyhow!(
                "proxy.ca_cert: {} is not a valid X.509 certificate: {e}",
                user.cert.display()
            )
        })?;
        let key = KeyPair::from_pem(&key_pem).map_err(|e| {
            anyhow::anyhow!(
                "proxy.ca_key: {} is not a usable private key (PKCS#8 PEM, ECDSA P-256/P-384, \
                 Ed25519 or RSA): {e}",
                user.key.display()
            )
        })?;
        if x509.public_key().raw != key.public_key_der().as_slice() {
            anyhow::bail!(
                "proxy.ca_key: {} is not the key of the certificate in proxy.ca_cert {}",
                user.key.display(),
                user.cert.display()
            );
        }
        if !x509.validity().is_valid() {
            anyhow::bail!(
                "proxy.ca_cert: {} is not valid now (valid from {} to {})",
                user.cert.display(),
                x509.validity().not_before,
                x509.validity().not_after
            );
        }
        // rcgen keeps one value per attribute type and panics on an empty RDN set: such a
        // name could not be written back as the leaves' issuer.
        if x509.subject().iter().any(|rdn| rdn.iter().count() != 1) {
            anyhow::bail!(
                "proxy.ca_cert: {} has a subject name with multi-valued or empty parts, which \
                 this proxy cannot reproduce as its leaves' issuer",
                user.cert.display()
            );
        }
        let params = CertificateParams::from_ca_cert_der(&ca_der.as_slice().into())
            .map_err(|e| anyhow::anyhow!("proxy.ca_cert: {}: {e}", user.cert.display()))?;
        if !matches!(params.is_ca, IsCa::Ca(_)) {
            anyhow::bail!(
                "proxy.ca_cert: {} is not a CA certificate (its basic constraints lack CA:TRUE); \
                 leaves signed by it would be rejected by clients",
                user.cert.display()
            );
        }
        // rcgen signs leaves with an issuer `Certificate`; one made from the parsed
        // parameters carries the CA's subject name and key identifier, which is all that
        // signing takes from it. The chain sent to clients holds the user's own CA file.
        let cert = params
            .self_signed(&key)
            .context("proxy.ca_cert: preparing the CA for signing")?;
        tracing::info!(
            "proxy: intercepted HTTPS hosts get leaves signed by the CA in {}",
            user.cert.display()
        );
        let ca = Self {
            cert,
            key,
            ca_der: ca_der.clone(),
            hosts,
            leaves: Mutex::new(HashMap::new()),
            cert_path: user.cert.to_path_buf(),
        };
        // A leaf chains only when its issuer name is the CA's subject byte for byte.
        let (probe, _) = ca.sign_leaf("probe.invalid")?;
        let same_name = x509_parser::parse_x509_certificate(probe.der())
            .map(|(_, leaf)| leaf.issuer().as_raw() == x509.subject().as_raw())
            .unwrap_or(false);
        if !same_name {
            anyhow::bail!(
                "proxy.ca_cert: {}: the subject name cannot be reproduced as the leaves' issuer \
                 (repeated attribute types?); leaves would not chain to it",
                user.cert.display()
            );
        }
        Ok(ca)
    }

    /// A leaf certificate for `host` and its key, signed by the CA.
    fn sign_leaf(&self, host: &str) -> anyhow::Result<(rcgen::Certificate, KeyPair)> {
        let key = KeyPair::generate().context("leaf key")?;
        let mut p = CertificateParams::new(vec![host.to_string()])
            .with_context(|| format!("leaf for {host:?}"))?;
        p.distinguished_name.push(DnType::CommonName, host);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = p
            .signed_by(&key, &self.cert, &self.key)
            .with_context(|| format!("signing a leaf for {host:?}"))?;
        Ok((leaf, key))
    }

    /// Whether the proxy terminates TLS for `host` (a rule matches `host` or `host:port`).
    pub fn intercepts(&self, host: &str, authority: &str) -> bool {
        self.hosts
            .iter()
            .any(|r| r.is_match(host) || r.is_match(authority))
    }

    /// A TLS server configuration presenting a leaf for `host` (minted once per host).
    pub fn server_config(&self, host: &str) -> anyhow::Result<Arc<rustls::ServerConfig>> {
        let mut leaves = match self.leaves.lock() {
            Ok(l) => l,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some(c) = leaves.get(host) {
            return Ok(c.clone());
        }
        let (leaf, key) = self.sign_leaf(host)?;
        let chain = vec![
            rustls::pki_types::CertificateDer::from(leaf.der().to_vec()),
            rustls::pki_types::CertificateDer::from(self.ca_der.clone()),
        ];
        let key_der = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
        let mut config = rustls::ServerConfig::builder_with_provider(wire::tls::provider())
            .with_safe_default_protocol_versions()
            .context("TLS versions")?
            .with_no_client_auth()
            .with_single_cert(chain, key_der)
            .context("leaf certificate")?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let config = Arc::new(config);
        leaves.insert(host.to_string(), config.clone());
        Ok(config)
    }
}

fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_file_survives_a_restart_and_hosts_are_matched() {
        let dir = tempfile::tempdir().expect("temp dir");
        let hosts = vec!["^registry\\.example$".to_string()];
        let first = ProxyCa::open(dir.path(), &hosts, None).expect("CA");
        let pem = std::fs::read(&first.cert_path).expect("CA file");
        drop(first);
        let again = ProxyCa::open(dir.path(), &hosts, None).expect("CA again");
        assert_eq!(
            std::fs::read(&again.cert_path).expect("CA file"),
            pem,
            "not rewritten"
        );
        assert!(again.intercepts("registry.example", "registry.example:443"));
        assert!(!again.intercepts("other.example", "other.example:443"));
        again.server_config("registry.example").expect("leaf");
    }

    /// Writes a CA (or, with `is_ca` false, an end-entity certificate) and its key.
    fn write_ca(dir: &Path, name: &str, is_ca: bool) -> (PathBuf, PathBuf) {
        let key = KeyPair::generate().expect("key");
        let mut p = CertificateParams::new(Vec::<String>::new()).expect("params");
        if is_ca {
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        }
        p.distinguished_name
            .push(DnType::OrganizationName, "Example Corp");
        p.distinguished_name.push(DnType::CommonName, name);
        let cert = p.self_signed(&key).expect("self-signed");
        let cert_path = dir.join(format!("{name}.pem"));
        let key_path = dir.join(format!("{name}-key.pem"));
        std::fs::write(&cert_path, cert.pem()).expect("cert file");
        std::fs::write(&key_path, key.serialize_pem()).expect("key file");
        (cert_path, key_path)
    }

    fn open_user(dir: &Path, cert: &Path, key: &Path) -> anyhow::Result<ProxyCa> {
        ProxyCa::open(
            dir,
            &["^registry\\.example$".to_string()],
            Some(UserCa { cert, key }),
        )
    }

    #[test]
    fn a_user_ca_signs_the_leaves_and_nothing_is_generated() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = write_ca(dir.path(), "corp-ca", true);
        let ca = open_user(dir.path(), &cert, &key).expect("user CA");
        assert_eq!(ca.cert_path, cert);
        assert!(!dir.path().join("proxy-ca.pem").exists(), "no CA generated");
        ca.server_config("registry.example").expect("server config");
        // A leaf verifies against the user's CA alone.
        let leaf = ca.sign_leaf("registry.example").expect("leaf").0;
        let mut roots = rustls::RootCertStore::empty();
        roots
            .add(rustls::pki_types::CertificateDer::from(
                std::fs::read(&cert)
                    .ok()
                    .and_then(|pem| {
                        x509_parser::pem::Pem::iter_from_buffer(&pem)
                            .find_map(Result::ok)
                            .map(|p| p.contents)
                    })
                    .expect("CA DER"),
            ))
            .expect("root");
        let verifier = rustls::client::WebPkiServerVerifier::builder_with_provider(
            Arc::new(roots),
            wire::tls::provider(),
        )
        .build()
        .expect("verifier");
        use rustls::client::danger::ServerCertVerifier as _;
        verifier
            .verify_server_cert(
                &rustls::pki_types::CertificateDer::from(leaf.der().to_vec()),
                &[],
                &rustls::pki_types::ServerName::try_from("registry.example").expect("name"),
                &[],
                rustls::pki_types::UnixTime::now(),
            )
            .expect("the leaf chains to the user's CA");
    }

    #[test]
    fn a_user_ca_is_checked_at_start() {
        let dir = tempfile::tempdir().expect("temp dir");
        let (cert, key) = write_ca(dir.path(), "corp-ca", true);
        let (_, other_key) = write_ca(dir.path(), "other-ca", true);
        let (leaf_cert, leaf_key) = write_ca(dir.path(), "not-a-ca", false);
        let err = |cert: &Path, key: &Path| {
            format!(
                "{:#}",
                open_user(dir.path(), cert, key).expect_err("refused")
            )
        };
        let e = err(&cert, &other_key);
        assert!(
            e.contains("is not the key of the certificate in proxy.ca_cert"),
            "{e}"
        );
        let e = err(&leaf_cert, &leaf_key);
        assert!(e.contains("is not a CA certificate"), "{e}");
        let e = err(&dir.path().join("missing.pem"), &key);
        assert!(e.contains("proxy.ca_cert: reading"), "{e}");
        let e = err(&cert, &dir.path().join("missing-key.pem"));
        assert!(e.contains("proxy.ca_key: reading"), "{e}");
        let e = err(&key, &key);
        assert!(e.contains("holds no PEM certificate"), "{e}");
        let e = err(&cert, &cert);
        assert!(e.contains("is not a usable private key"), "{e}");
    }
}
