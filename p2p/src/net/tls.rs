//! Mutual TLS for pieces between nodes (`peer_tls`): every node shows the certificate the
//! cluster's CA issued it, and checks the other side's against that CA. A child checks that the
//! parent's certificate names the address it dialled; a parent accepts any child the CA vouches
//! for, whose scheduler token then says what it may read.

use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use super::{ClusterTls, NetError};

fn fail(what: &str, e: impl std::fmt::Display) -> NetError {
    NetError::Config(format!("peer TLS {what}: {e}"))
}

/// The upload server's side: this node's certificate, and client certificates required.
pub(crate) fn acceptor(tls: &ClusterTls) -> Result<TlsAcceptor, NetError> {
    let Some((cert, key)) = &tls.identity else { return Err(fail("", "needs this node's certificate and key")) };
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_slice_iter(&tls.ca) {
        roots.add(ca.map_err(|e| fail("CA", e))?).map_err(|e| fail("CA", e))?;
    }
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone())
        .build()
        .map_err(|e| fail("CA", e))?;
    let chain =
        CertificateDer::pem_slice_iter(cert).collect::<Result<Vec<_>, _>>().map_err(|e| fail("certificate", e))?;
    let key = PrivateKeyDer::from_pem_slice(key).map_err(|e| fail("key", e))?;
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| fail("versions", e))?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(|e| fail("certificate", e))?;
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The piece client's side: only the cluster's CA is trusted, and this node's certificate is
/// shown to parents.
pub(crate) fn client(builder: reqwest::ClientBuilder, tls: &ClusterTls) -> Result<reqwest::ClientBuilder, NetError> {
    let Some((cert, key)) = &tls.identity else { return Err(fail("", "needs this node's certificate and key")) };
    let mut builder = builder.use_rustls_tls().tls_built_in_root_certs(false);
    for ca in reqwest::Certificate::from_pem_bundle(&tls.ca).map_err(|e| fail("CA", e))? {
        builder = builder.add_root_certificate(ca);
    }
    let identity = reqwest::Identity::from_pem(&[cert.as_slice(), b"\n", key.as_slice()].concat())
        .map_err(|e| fail("certificate", e))?;
    Ok(builder.identity(identity))
}
