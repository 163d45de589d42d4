//! The certificate authority HTTPS interception signs with: the operator's (`proxy_ca_cert`,
//! `proxy_ca_key`), or one generated on first start and kept in the data dir
//! (`proxy-ca.pem`, and `proxy-ca.key` readable by its owner only). Clients that go through
//! interception must trust its certificate. Each intercepted host gets a certificate minted
//! for it, kept for later tunnels (most recently used first).

use std::fs;
use std::io::Write;
use std::num::NonZeroUsize;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use lru::LruCache;
use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio_rustls::rustls::ServerConfig;

/// Minted certificates kept; more hosts than this mint again.
const MINTED: usize = 1024;
/// How long a minted certificate is served before one is minted again.
const REMINT_AFTER: Duration = Duration::from_secs(30 * 86_400);
const CERT_FILE: &str = "proxy-ca.pem";
const KEY_FILE: &str = "proxy-ca.key";

pub struct InterceptCa {
    issuer: Certificate,
    key: KeyPair,
    /// The CA certificate as configured or generated, for clients to trust.
    pub cert_pem: String,
    /// By host: when it was minted, and the TLS made with it.
    minted: Mutex<LruCache<String, (Instant, Arc<ServerConfig>)>>,
}

impl InterceptCa {
    /// The operator's CA (both files given), else the one in `data_dir`, made there if there
    /// is none.
    pub fn load_or_create(cert: Option<&Path>, key: Option<&Path>, data_dir: &Path) -> Result<InterceptCa, String> {
        let (cert, key) = match (cert, key) {
            (Some(c), Some(k)) => (c.to_owned(), k.to_owned()),
            (None, None) => {
                let (c, k) = (data_dir.join(CERT_FILE), data_dir.join(KEY_FILE));
                // One file without the other is a generation cut short: start again.
                if !(c.exists() && k.exists()) {
                    for lone in [&c, &k] {
                        if lone.exists() {
                            fs::remove_file(lone).map_err(|e| format!("{}: {e}", lone.display()))?;
                        }
                    }
                    generate(&c, &k)?;
                }
                (c, k)
            }
            _ => return Err("proxy_ca_cert and proxy_ca_key go together".to_owned()),
        };
        let read = |p: &PathBuf| fs::read_to_string(p).map_err(|e| format!("{}: {e}", p.display()));
        let (cert_pem, key_pem) = (read(&cert)?, read(&key)?);
        let key = KeyPair::from_pem(&key_pem).map_err(|e| format!("{}: {e}", key.display()))?;
        let params = CertificateParams::from_ca_cert_pem(&cert_pem).map_err(|e| format!("{}: {e}", cert.display()))?;
        // The same name and key as the file's certificate: what it signs verifies against it.
        let issuer = params.self_signed(&key).map_err(|e| format!("{}: {e}", cert.display()))?;
        let minted = Mutex::new(LruCache::new(NonZeroUsize::new(MINTED).unwrap_or(NonZeroUsize::MIN)));
        Ok(InterceptCa { issuer, key, cert_pem, minted })
    }

    /// TLS for `host` (a name or an address) with a certificate this CA signs for it.
    pub fn server_config(&self, host: &str) -> Result<Arc<ServerConfig>, String> {
        let host = host.trim_start_matches('[').trim_end_matches(']').to_ascii_lowercase();
        if let Some((at, config)) = self.minted.lock().unwrap_or_else(|e| e.into_inner()).get(&host) {
            // Minted certificates last a year or more; minting again well before keeps a
            // long-running daemon from serving an expired one.
            if at.elapsed() < REMINT_AFTER {
                return Ok(config.clone());
            }
        }
        let mut params = CertificateParams::new(vec![host.clone()]).map_err(|e| format!("{host}: {e}"))?;
        params.distinguished_name.push(DnType::CommonName, host.as_str());
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.use_authority_key_identifier_extension = true;
        let year = this_year();
        params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
        params.not_after = rcgen::date_time_ymd(year + 1, 12, 31);
        let key = KeyPair::generate().map_err(|e| format!("{host}: {e}"))?;
        let cert = params.signed_by(&key, &self.issuer, &self.key).map_err(|e| format!("{host}: {e}"))?;
        let chain = vec![cert.der().clone(), CertificateDer::from(self.issuer.der().to_vec())];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der()));
        // HTTP/1.1 only: the requests inside are handled one connection at a time.
        let config = damselfly_serve::server_config(chain, key, &[b"http/1.1"]).map_err(|e| format!("{host}: {e}"))?;
        let config = Arc::new(config);
        self.minted.lock().unwrap_or_else(|e| e.into_inner()).put(host, (Instant::now(), config.clone()));
        Ok(config)
    }
}

/// A new CA, written to `cert` and `key` (the key readable by its owner only).
fn generate(cert: &Path, key: &Path) -> Result<(), String> {
    let mut params = CertificateParams::new(Vec::<String>::new()).map_err(|e| e.to_string())?;
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.distinguished_name.push(DnType::CommonName, "Damselfly proxy CA");
    params.distinguished_name.push(DnType::OrganizationName, "Damselfly");
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    let year = this_year();
    params.not_before = rcgen::date_time_ymd(year - 1, 1, 1);
    params.not_after = rcgen::date_time_ymd(year + 10, 12, 31);
    let pair = KeyPair::generate().map_err(|e| e.to_string())?;
    let ca = params.self_signed(&pair).map_err(|e| e.to_string())?;
    if let Some(dir) = key.parent() {
        fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let write = |path: &Path, text: &str, mode: u32| -> Result<(), String> {
        let mut f = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(mode)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        f.write_all(text.as_bytes()).and_then(|()| f.sync_all()).map_err(|e| format!("{}: {e}", path.display()))
    };
    write(key, &pair.serialize_pem(), 0o600)?;
    write(cert, &ca.pem(), 0o644)?;
    tracing::info!(cert = %cert.display(), "generated the CA for HTTPS interception; clients that use it must trust this certificate");
    Ok(())
}

/// The current year, from the clock (days since 1970 / 365.2425 is exact enough for validity
/// bounds a year wide).
fn this_year() -> i32 {
    let secs = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    1970 + (secs as f64 / (365.2425 * 86_400.0)) as i32
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use tokio_rustls::rustls;

    #[test]
    fn a_generated_ca_is_kept_owner_only_and_reused() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = InterceptCa::load_or_create(None, None, dir.path()).expect("generated");
        let mode = fs::metadata(dir.path().join(KEY_FILE)).expect("key").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        let again = InterceptCa::load_or_create(None, None, dir.path()).expect("loaded");
        assert_eq!(ca.cert_pem, again.cert_pem, "a second start made a new CA");
        // A key without its certificate (a first start cut short) is replaced by a new pair.
        fs::remove_file(dir.path().join(CERT_FILE)).expect("remove");
        let fresh = InterceptCa::load_or_create(None, None, dir.path()).expect("made again");
        assert_ne!(fresh.cert_pem, ca.cert_pem);
        assert!(again.server_config("registry.example").is_ok());
        assert!(again.server_config("10.0.0.5").is_ok());
    }

    /// A TLS handshake, in memory, of a client trusting only `ca` with the certificate minted
    /// for `minted_for`, the client asking for `name`.
    async fn handshake(ca: &InterceptCa, minted_for: &str, name: &str) -> bool {
        use rustls::pki_types::pem::PemObject;
        let mut roots = rustls::RootCertStore::empty();
        roots.add(CertificateDer::from_pem_slice(ca.cert_pem.as_bytes()).expect("pem")).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        let acceptor = tokio_rustls::TlsAcceptor::from(ca.server_config(minted_for).expect("minted"));
        let (a, b) = tokio::io::duplex(64 << 10);
        let name = rustls::pki_types::ServerName::try_from(name.to_owned()).expect("name");
        let server = tokio::spawn(async move { acceptor.accept(b).await.is_ok() });
        let client_ok = connector.connect(name, a).await.is_ok();
        let _ = server.await;
        client_ok
    }

    #[tokio::test]
    async fn minted_certificates_verify_against_the_ca_for_their_host_only() {
        let dir = tempfile::tempdir().expect("dir");
        let ca = InterceptCa::load_or_create(None, None, dir.path()).expect("generated");
        assert!(handshake(&ca, "registry.example", "registry.example").await);
        assert!(handshake(&ca, "10.0.0.5", "10.0.0.5").await);
        assert!(!handshake(&ca, "registry.example", "other.example").await);
        let elsewhere = tempfile::tempdir().expect("dir");
        let stranger = InterceptCa::load_or_create(None, None, elsewhere.path()).expect("generated");
        let mixed = InterceptCa { cert_pem: ca.cert_pem.clone(), ..stranger };
        assert!(!handshake(&mixed, "registry.example", "registry.example").await, "another CA's certificate passed");
    }
}
