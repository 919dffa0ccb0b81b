//! The registry proxy's certificate authority for `CONNECT` interception: hosts named by
//! `proxy.hijack_hosts` get their TLS terminated by the proxy with a leaf certificate minted
//! here for the host the client asked for, signed by a CA the daemon generates once and
//! writes out (`<storage.dir>/proxy-ca.pem`) for clients to trust.
//!
//! The CA's key is kept beside it (`proxy-ca-key.pem`, mode 0600). On a later start the key
//! is read back and the CA is made again from it with the same name, so leaves minted after a
//! restart still chain to the certificate clients already trust; the file is not rewritten.

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
    /// Loads (or, the first time, generates and writes) the CA in `dir`; `hosts` are the
    /// `proxy.hijack_hosts` regexes.
    pub fn open(dir: &Path, hosts: &[String]) -> anyhow::Result<Self> {
        let hosts = hosts
            .iter()
            .map(|h| Regex::new(h).with_context(|| format!("proxy.hijack_hosts: {h:?}")))
            .collect::<anyhow::Result<Vec<_>>>()?;
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
        let key = KeyPair::generate().context("leaf key")?;
        let mut p = CertificateParams::new(vec![host.to_string()])
            .with_context(|| format!("leaf for {host:?}"))?;
        p.distinguished_name.push(DnType::CommonName, host);
        p.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let leaf = p
            .signed_by(&key, &self.cert, &self.key)
            .with_context(|| format!("signing a leaf for {host:?}"))?;
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
        let first = ProxyCa::open(dir.path(), &hosts).expect("CA");
        let pem = std::fs::read(&first.cert_path).expect("CA file");
        drop(first);
        let again = ProxyCa::open(dir.path(), &hosts).expect("CA again");
        assert_eq!(
            std::fs::read(&again.cert_path).expect("CA file"),
            pem,
            "not rewritten"
        );
        assert!(again.intercepts("registry.example", "registry.example:443"));
        assert!(!again.intercepts("other.example", "other.example:443"));
        again.server_config("registry.example").expect("leaf");
    }
}
