//! Content digests: the identity of every task, and the only root of trust.

use std::fmt;
use std::str::FromStr;

use sha2::Digest as _;

/// A validated `algorithm:hex` digest. Only the algorithms OCI registries use are accepted,
/// with lowercase hex of exactly the algorithm's length, so a digest can safely become a file name.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest {
    algorithm: Algorithm,
    hex: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Algorithm {
    Sha256,
    Sha512,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DigestError {
    #[error("digest has no algorithm prefix")]
    MissingAlgorithm,
    #[error("unsupported digest algorithm {0:?}")]
    UnsupportedAlgorithm(String),
    #[error("digest hex must be {expected} lowercase hex characters")]
    BadHex { expected: usize },
}

impl Algorithm {
    pub fn name(self) -> &'static str {
        match self {
            Algorithm::Sha256 => "sha256",
            Algorithm::Sha512 => "sha512",
        }
    }

    fn hex_len(self) -> usize {
        match self {
            Algorithm::Sha256 => 64,
            Algorithm::Sha512 => 128,
        }
    }
}

impl Digest {
    pub fn parse(s: &str) -> Result<Self, DigestError> {
        let (algo, hex) = s.split_once(':').ok_or(DigestError::MissingAlgorithm)?;
        let algorithm = match algo {
            "sha256" => Algorithm::Sha256,
            "sha512" => Algorithm::Sha512,
            other => return Err(DigestError::UnsupportedAlgorithm(other.chars().take(32).collect())),
        };
        let expected = algorithm.hex_len();
        let valid = hex.len() == expected && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        if !valid {
            return Err(DigestError::BadHex { expected });
        }
        Ok(Digest { algorithm, hex: hex.to_owned() })
    }

    /// The digest of `data` under `algorithm`.
    pub fn of(algorithm: Algorithm, data: &[u8]) -> Self {
        let mut h = Hasher::new(algorithm);
        h.update(data);
        h.finish()
    }

    pub fn algorithm(&self) -> Algorithm {
        self.algorithm
    }

    pub fn hex(&self) -> &str {
        &self.hex
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}:{}", self.algorithm.name(), self.hex)
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

impl FromStr for Digest {
    type Err = DigestError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Digest::parse(s)
    }
}

impl serde::Serialize for Digest {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Digest {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Digest::parse(&s).map_err(serde::de::Error::custom)
    }
}

/// Incremental hashing for either supported algorithm.
#[derive(Clone)]
pub enum Hasher {
    Sha256(sha2::Sha256),
    Sha512(sha2::Sha512),
}

impl Hasher {
    pub fn new(algorithm: Algorithm) -> Self {
        match algorithm {
            Algorithm::Sha256 => Hasher::Sha256(sha2::Sha256::new()),
            Algorithm::Sha512 => Hasher::Sha512(sha2::Sha512::new()),
        }
    }

    pub fn update(&mut self, data: &[u8]) {
        match self {
            Hasher::Sha256(h) => h.update(data),
            Hasher::Sha512(h) => h.update(data),
        }
    }

    pub fn finish(self) -> Digest {
        let (algorithm, hex) = match self {
            Hasher::Sha256(h) => (Algorithm::Sha256, to_hex(&h.finalize())),
            Hasher::Sha512(h) => (Algorithm::Sha512, to_hex(&h.finalize())),
        };
        Digest { algorithm, hex }
    }
}

pub(crate) fn to_hex(bytes: &[u8]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_and_prints_sha256() {
        let s = format!("sha256:{}", "ab".repeat(32));
        let d = Digest::parse(&s).unwrap();
        assert_eq!(d.to_string(), s);
        assert_eq!(d.algorithm(), Algorithm::Sha256);
    }

    #[test]
    fn rejects_bad_digests() {
        assert_eq!(Digest::parse("abc"), Err(DigestError::MissingAlgorithm));
        assert!(matches!(Digest::parse("md5:00"), Err(DigestError::UnsupportedAlgorithm(_))));
        let upper = format!("sha256:{}", "AB".repeat(32));
        assert!(Digest::parse(&upper).is_err());
        let short = format!("sha256:{}", "a".repeat(63));
        assert!(Digest::parse(&short).is_err());
        let sha512_len_for_256 = format!("sha256:{}", "a".repeat(128));
        assert!(Digest::parse(&sha512_len_for_256).is_err());
        assert!(Digest::parse(&format!("sha512:{}", "a".repeat(128))).is_ok());
        assert!(Digest::parse(&format!("sha256:../{}", "a".repeat(61))).is_err());
    }

    #[test]
    fn hashes_known_value() {
        let d = Digest::of(Algorithm::Sha256, b"");
        assert_eq!(d.hex(), "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }

    proptest! {
        #[test]
        fn parse_never_panics_and_roundtrips(s in "\\PC{0,200}") {
            if let Ok(d) = Digest::parse(&s) {
                prop_assert_eq!(d.to_string(), s);
            }
        }

        #[test]
        fn valid_hex_always_parses(hex in "[0-9a-f]{64}") {
            let s = format!("sha256:{hex}");
            prop_assert_eq!(Digest::parse(&s).unwrap().to_string(), s);
        }
    }
}
