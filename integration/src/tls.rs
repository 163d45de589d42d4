//! Certificates for tests: a CA made with rcgen, and the certificates it signs, as PEM files.

use std::path::{Path, PathBuf};

use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair};

/// A CA and what it signed, as PEM files in a temporary directory.
pub struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    dir: PathBuf,
    /// The CA certificate's file name in `dir`.
    pub file: String,
}

impl TestCa {
    pub fn new(dir: &Path, name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(rcgen::DnType::CommonName, name);
        let key = KeyPair::generate().unwrap();
        let cert = params.self_signed(&key).unwrap();
        let file = format!("{name}.pem");
        std::fs::write(dir.join(&file), cert.pem()).unwrap();
        TestCa { cert, key, dir: dir.to_owned(), file }
    }

    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.join(file)
    }

    /// Signs a certificate for `names` (DNS names or IP addresses); writes NAME-by-CA.pem and
    /// NAME-by-CA.key.
    pub fn issue(&self, name: &str, names: &[&str]) -> (PathBuf, PathBuf) {
        let name = format!("{name}-by-{}", self.file.trim_end_matches(".pem"));
        let params = CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
        let key = KeyPair::generate().unwrap();
        let cert = params.signed_by(&key, &self.cert, &self.key).unwrap();
        let (c, k) = (self.path(&format!("{name}.pem")), self.path(&format!("{name}.key")));
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    }

    /// The CA certificate's path.
    pub fn cert_path(&self) -> PathBuf {
        self.path(&self.file)
    }
}
