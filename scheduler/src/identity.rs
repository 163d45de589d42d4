//! Who may be a seed. Seeds receive the credentials nodes share with them, so under mutual TLS
//! a scheduler can require the seed role to be written into the certificate itself: a host is
//! a seed only if its certificate is valid for the configured name. The CA then decides who
//! seeds, not whoever holds any certificate of the cluster and sets `seed` in its announcement.

use rustls_pki_types::{CertificateDer, ServerName};

use crate::error::SchedulerError;

#[derive(Clone, Debug)]
pub(crate) struct SeedName(ServerName<'static>);

impl SeedName {
    /// A DNS name or an IP address, as it must appear in a seed's certificate.
    pub fn parse(name: &str) -> Result<Self, SchedulerError> {
        ServerName::try_from(name.to_owned())
            .map(SeedName)
            .map_err(|_| SchedulerError::Tls(format!("seed name {name:?} is neither a DNS name nor an IP address")))
    }

    /// Whether `chain` (the client's, leaf first, already verified against the client CA by
    /// the handshake) names a seed.
    pub fn admits(&self, chain: Option<&[CertificateDer<'_>]>) -> bool {
        let Some(leaf) = chain.and_then(<[_]>::first) else { return false };
        webpki::EndEntityCert::try_from(leaf).is_ok_and(|cert| cert.verify_is_valid_for_subject_name(&self.0).is_ok())
    }
}

impl std::fmt::Display for SeedName {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0.to_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cert(names: &[&str]) -> CertificateDer<'static> {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let key = rcgen::KeyPair::generate().unwrap();
        rcgen::CertificateParams::new(names).unwrap().self_signed(&key).unwrap().der().clone()
    }

    #[test]
    fn only_a_certificate_for_the_seed_name_admits_a_seed() {
        let name = SeedName::parse("seed.cluster.internal").unwrap();
        assert!(name.admits(Some(&[cert(&["node-7", "seed.cluster.internal"])])));
        assert!(!name.admits(Some(&[cert(&["node-7", "10.0.0.7"])])));
        assert!(!name.admits(Some(&[cert(&["other.cluster.internal"])])));
        assert!(!name.admits(Some(&[CertificateDer::from(b"not a certificate".to_vec())])));
        assert!(!name.admits(Some(&[])));
        assert!(!name.admits(None));
        let ip = SeedName::parse("10.0.0.9").unwrap();
        assert!(ip.admits(Some(&[cert(&["10.0.0.9"])])));
        assert!(!ip.admits(Some(&[cert(&["10.0.0.7"])])));
    }

    #[test]
    fn a_seed_name_must_be_a_dns_name_or_an_ip_address() {
        assert!(SeedName::parse("seed.cluster.internal").is_ok());
        assert!(SeedName::parse("bad name!").is_err());
        assert!(SeedName::parse("").is_err());
    }
}
