//! Forwarding an absolute-form request as it is: one upstream connection per request, the
//! request body and the response body streamed, hop-by-hop headers dropped in both directions
//! (RFC 9110, section 7.6.1) and `Via` added.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, CONNECTION, HOST, VIA};
use http::uri::Scheme;
use http::{Request, Response};
use http_body_util::BodyExt;
use hyper::body::Body as HttpBody;
use hyper_util::rt::TokioIo;
use tokio_rustls::rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use tokio_rustls::rustls::{self, DigitallySignedStruct};
use tokio_rustls::TlsConnector;

use super::{Client, Proxy, ProxyError, Target};
use crate::api::response::{Body, BodyError};

/// How long the upstream has to start its answer.
const HEAD_TIMEOUT: Duration = Duration::from_secs(60);

/// Hop-by-hop headers: they describe one connection, not the message.
const HOP_BY_HOP: [&str; 9] = [
    "connection",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

pub(super) const VIA_VALUE: &str = "1.1 damselfly";

impl Proxy {
    pub(super) async fn forward<B>(
        &self,
        req: Request<B>,
        target: Target,
        client: Client,
    ) -> Result<Response<Body>, ProxyError>
    where
        B: HttpBody<Data = Bytes> + Send + 'static,
        B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    {
        let reach = self.reach(target.scheme.as_str(), &target.host, target.port, client)?;
        let stream = self
            .app
            .upstream
            .connect(&target.host, target.port, reach)
            .await
            .map_err(|e| ProxyError::Unreachable(target.authority.to_string(), e))?;
        let mut sender = match target.scheme == Scheme::HTTPS {
            false => open(stream).await?,
            true => {
                let name = ServerName::try_from(target.host.trim_start_matches('[').trim_end_matches(']').to_owned())
                    .map_err(|_| ProxyError::BadRequest("the host is not a TLS server name"))?;
                let connector = match self.app.upstream.is_insecure(&target.host, target.port) {
                    true => &self.upstream_tls.unverified,
                    false => &self.upstream_tls.verified,
                };
                let tls = connector
                    .connect(name, stream)
                    .await
                    .map_err(|e| ProxyError::Unreachable(target.authority.to_string(), e))?;
                open(tls).await?
            }
        };
        let (mut parts, body) = req.into_parts();
        parts.uri = target.origin_form.clone();
        strip_hop_by_hop(&mut parts.headers);
        // RFC 9112, section 3.2.2: the request line's authority wins over a Host header.
        if let Ok(host) = HeaderValue::from_str(target.authority.as_str()) {
            parts.headers.insert(HOST, host);
        }
        parts.headers.append(VIA, HeaderValue::from_static(VIA_VALUE));
        let sent = tokio::time::timeout(HEAD_TIMEOUT, sender.send_request(Request::from_parts(parts, body)));
        let resp = match sent.await {
            Ok(r) => r.map_err(ProxyError::Upstream)?,
            Err(_) => {
                let e = std::io::Error::new(std::io::ErrorKind::TimedOut, "no answer in time");
                return Err(ProxyError::Unreachable(target.authority.to_string(), e));
            }
        };
        let (mut parts, body) = resp.into_parts();
        strip_hop_by_hop(&mut parts.headers);
        parts.headers.append(VIA, HeaderValue::from_static(VIA_VALUE));
        let body = body.map_err(|e| BodyError(e.to_string())).boxed_unsync();
        Ok(Response::from_parts(parts, body))
    }
}

/// An HTTP/1.1 client connection over `io`, driven in its own task.
async fn open<IO, B>(io: IO) -> Result<hyper::client::conn::http1::SendRequest<B>, ProxyError>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io)).await.map_err(ProxyError::Upstream)?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            tracing::debug!(error = %e, "forwarded connection ended with an error");
        }
    });
    Ok(sender)
}

/// TLS to the hosts requests are forwarded to, HTTP/1.1.
pub(super) struct UpstreamTls {
    /// The bundled roots and the configured extras trusted, the host's name verified.
    verified: TlsConnector,
    /// For hosts listed in `insecure_registries`: any certificate, as docker does for them
    /// (the handshake's signatures are still checked).
    unverified: TlsConnector,
}

impl UpstreamTls {
    pub(super) fn new(extra: &[CertificateDer<'static>]) -> Result<UpstreamTls, String> {
        let mut roots = rustls::RootCertStore { roots: webpki_roots::TLS_SERVER_ROOTS.to_vec() };
        for cert in extra {
            roots.add(cert.clone()).map_err(|e| format!("upstream CA certificate: {e}"))?;
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = || {
            rustls::ClientConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .map_err(|e| e.to_string())
        };
        let mut verified = builder()?.with_root_certificates(roots).with_no_client_auth();
        let mut unverified = builder()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider.clone())))
            .with_no_client_auth();
        verified.alpn_protocols = vec![b"http/1.1".to_vec()];
        unverified.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(UpstreamTls {
            verified: TlsConnector::from(Arc::new(verified)),
            unverified: TlsConnector::from(Arc::new(unverified)),
        })
    }
}

/// Takes any certificate, and checks only that the server holds its key.
#[derive(Debug)]
struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// Drops the hop-by-hop headers, and those the `Connection` header names as such.
pub(super) fn strip_hop_by_hop(headers: &mut HeaderMap) {
    let named: Vec<HeaderName> = headers
        .get_all(CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|name| HeaderName::from_bytes(name.trim().as_bytes()).ok())
        .collect();
    for name in named {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(name);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_headers_and_those_connection_names_are_dropped() {
        let mut h = HeaderMap::new();
        for (k, v) in [
            ("connection", "keep-alive, x-secret-hop"),
            ("keep-alive", "timeout=5"),
            ("proxy-authorization", "Basic x"),
            ("x-secret-hop", "1"),
            ("te", "trailers"),
            ("accept", "a"),
            ("authorization", "Bearer t"),
        ] {
            h.append(k, HeaderValue::from_static(v));
        }
        h.append("accept", HeaderValue::from_static("b"));
        strip_hop_by_hop(&mut h);
        let left: Vec<&str> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(left, ["accept", "authorization"]);
        assert_eq!(h.get_all("accept").iter().count(), 2, "repeated headers stay repeated");
    }
}
