//! The credential the preheat API, the notification endpoint and the console ask for, in the
//! three shapes Harbor sends: a Bearer token (its `OAUTH` mode; `?access_token=` too), HTTP
//! Basic, or one custom header. With none configured the API is open (to whoever reaches the
//! port: bind it accordingly); with any, a request must carry one of them.

use base64::Engine;
use http::header::AUTHORIZATION;
use http::HeaderMap;
use subtle::ConstantTimeEq;

#[derive(Clone, Default)]
pub struct Credentials {
    pub bearer: Option<String>,
    /// `user:password`.
    pub basic: Option<String>,
    /// Header name (lowercase) and value.
    pub header: Option<(http::HeaderName, String)>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Credentials")
            .field("bearer", &self.bearer.as_ref().map(|_| "<redacted>"))
            .field("basic", &self.basic.as_ref().map(|_| "<redacted>"))
            .field("header", &self.header.as_ref().map(|(n, _)| n))
            .finish()
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CredentialError {
    #[error("{0} is empty")]
    Empty(&'static str),
    #[error("the Basic credential must read user:password")]
    Basic,
    #[error("the header credential must read `Name: value` with a valid header name")]
    Header,
}

impl Credentials {
    pub fn is_open(&self) -> bool {
        self.bearer.is_none() && self.basic.is_none() && self.header.is_none()
    }

    /// Reads the token, `user:password` and `Name: value` files' contents (trailing newline
    /// ignored).
    pub fn from_texts(
        bearer: Option<&str>,
        basic: Option<&str>,
        header: Option<&str>,
    ) -> Result<Credentials, CredentialError> {
        Ok(Credentials { bearer: read_bearer(bearer)?, basic: read_basic(basic)?, header: read_header(header)? })
    }

    /// Whether a request with these headers and query may pass.
    pub fn admits(&self, headers: &HeaderMap, query: Option<&str>) -> bool {
        if self.is_open() {
            return true;
        }
        let authorization = headers.get(AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
        if let Some(token) = &self.bearer {
            let sent = authorization.strip_prefix("Bearer ").or_else(|| authorization.strip_prefix("bearer "));
            if sent.is_some_and(|s| same(s, token)) || query_token(query).is_some_and(|s| same(&s, token)) {
                return true;
            }
        }
        if let Some(pair) = &self.basic {
            let sent = authorization.strip_prefix("Basic ").or_else(|| authorization.strip_prefix("basic "));
            let decoded = sent.and_then(|s| base64::engine::general_purpose::STANDARD.decode(s.trim()).ok());
            if decoded.is_some_and(|d| same_bytes(&d, pair.as_bytes())) {
                return true;
            }
        }
        if let Some((name, value)) = &self.header {
            if headers.get(name).and_then(|v| v.to_str().ok()).is_some_and(|v| same(v, value)) {
                return true;
            }
        }
        false
    }
}

fn trim(s: &str) -> &str {
    s.trim_end_matches(['\r', '\n'])
}

/// A token file's contents.
pub fn read_bearer(text: Option<&str>) -> Result<Option<String>, CredentialError> {
    match text.map(trim) {
        Some("") => Err(CredentialError::Empty("the preheat token")),
        t => Ok(t.map(str::to_owned)),
    }
}

/// A `user:password` file's contents.
pub fn read_basic(text: Option<&str>) -> Result<Option<String>, CredentialError> {
    match text.map(trim) {
        Some(b) if b.split_once(':').is_none_or(|(u, _)| u.is_empty()) => Err(CredentialError::Basic),
        b => Ok(b.map(str::to_owned)),
    }
}

/// A `Name: value` file's contents.
pub fn read_header(text: Option<&str>) -> Result<Option<(http::HeaderName, String)>, CredentialError> {
    let Some(line) = text.map(trim) else { return Ok(None) };
    let (name, value) = line.split_once(':').ok_or(CredentialError::Header)?;
    let name = http::HeaderName::from_bytes(name.trim().as_bytes()).map_err(|_| CredentialError::Header)?;
    match value.trim() {
        "" => Err(CredentialError::Empty("the header credential's value")),
        value => Ok(Some((name, value.to_owned()))),
    }
}

fn query_token(query: Option<&str>) -> Option<String> {
    url::form_urlencoded::parse(query?.as_bytes()).find(|(k, _)| k == "access_token").map(|(_, v)| v.into_owned())
}

fn same(a: &str, b: &str) -> bool {
    same_bytes(a.as_bytes(), b.as_bytes())
}

fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                http::HeaderName::from_bytes(k.as_bytes()).expect("name"),
                HeaderValue::from_str(v).expect("value"),
            );
        }
        h
    }

    #[test]
    fn each_of_harbors_auth_modes_is_admitted_and_nothing_else() {
        let creds = Credentials::from_texts(Some("tok\n"), Some("admin:pw"), Some("X-Api-Key: k1")).expect("creds");
        assert!(creds.admits(&headers(&[("authorization", "Bearer tok")]), None));
        assert!(creds.admits(&HeaderMap::new(), Some("a=1&access_token=tok")));
        assert!(creds.admits(&headers(&[("authorization", "Basic YWRtaW46cHc=")]), None));
        assert!(creds.admits(&headers(&[("x-api-key", "k1")]), None));
        assert!(!creds.admits(&HeaderMap::new(), None));
        assert!(!creds.admits(&headers(&[("authorization", "Bearer tok2")]), None));
        assert!(!creds.admits(&headers(&[("authorization", "Bearer to")]), None));
        assert!(!creds.admits(&headers(&[("authorization", "Basic YWRtaW46eA==")]), None));
        assert!(!creds.admits(&headers(&[("x-api-key", "k2")]), Some("access_token=no")));
        assert!(Credentials::default().admits(&HeaderMap::new(), None));
    }

    #[test]
    fn malformed_credentials_are_refused_at_start() {
        assert_eq!(
            Credentials::from_texts(Some("\n"), None, None).err(),
            Some(CredentialError::Empty("the preheat token"))
        );
        assert_eq!(Credentials::from_texts(None, Some("nocolon"), None).err(), Some(CredentialError::Basic));
        assert_eq!(Credentials::from_texts(None, None, Some("bad name: v")).err(), Some(CredentialError::Header));
        assert!(format!("{:?}", Credentials::from_texts(Some("secret"), None, None).expect("ok")).contains("redacted"));
    }
}
