//! Test certificates made at run time with rcgen: a CA and leaf certificates it signs, all
//! written as PEM files, for TLS tests.

use anyhow::{Context, Result};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// A certificate authority whose key is kept to sign leaves.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    /// PEM file of the CA certificate.
    pub cert_path: PathBuf,
    dir: PathBuf,
    name: String,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa")
            .field("name", &self.name)
            .field("cert_path", &self.cert_path)
            .finish_non_exhaustive()
    }
}

/// PEM files of a leaf certificate and its key.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// Certificate file.
    pub cert: PathBuf,
    /// Private key file.
    pub key: PathBuf,
}

impl TestCa {
    /// A new CA named `name`, its certificate written to `<dir>/<name>-ca.pem`.
    pub fn new(dir: &Path, name: &str) -> Result<Self> {
        let key = KeyPair::generate().context("CA key")?;
        let mut p = CertificateParams::new(Vec::<String>::new()).context("CA params")?;
        p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        p.distinguished_name
            .push(DnType::CommonName, format!("{name} test CA"));
        p.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = p.self_signed(&key).context("signing the CA")?;
        let cert_path = dir.join(format!("{name}-ca.pem"));
        std::fs::write(&cert_path, cert.pem())
            .with_context(|| format!("writing {}", cert_path.display()))?;
        Ok(Self {
            cert,
            key,
            cert_path,
            dir: dir.to_path_buf(),
            name: name.to_string(),
        })
    }

    /// A leaf certificate for `names` (DNS names or IPs), usable by servers and clients,
    /// written to `<dir>/<ca>-<leaf>.pem` and `<dir>/<ca>-<leaf>-key.pem`.
    pub fn leaf(&self, leaf: &str, names: &[&str]) -> Result<Leaf> {
        let key = KeyPair::generate().context("leaf key")?;
        let sans: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut p = CertificateParams::new(sans).context("leaf params")?;
        p.distinguished_name.push(DnType::CommonName, leaf);
        p.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        let cert = p
            .signed_by(&key, &self.cert, &self.key)
            .context("signing a leaf")?;
        let out = Leaf {
            cert: self.dir.join(format!("{}-{leaf}.pem", self.name)),
            key: self.dir.join(format!("{}-{leaf}-key.pem", self.name)),
        };
        std::fs::write(&out.cert, cert.pem())
            .with_context(|| format!("writing {}", out.cert.display()))?;
        std::fs::write(&out.key, key.serialize_pem())
            .with_context(|| format!("writing {}", out.key.display()))?;
        Ok(out)
    }
}

/// A YAML `tls:` block (indented by `indent` spaces) for `ca` and `leaf`.
pub fn tls_yaml(indent: usize, ca: &Path, leaf: Option<&Leaf>, client_auth: bool) -> String {
    let pad = " ".repeat(indent);
    let mut s = format!("{pad}tls:\n{pad}  ca_cert: {}\n", ca.display());
    if let Some(l) = leaf {
        s += &format!(
            "{pad}  cert: {}\n{pad}  key: {}\n",
            l.cert.display(),
            l.key.display()
        );
    }
    s += &format!("{pad}  client_auth: {client_auth}\n");
    s
}
