//! OCI distribution error codes and the JSON error body every registry client understands.

use std::fmt;

use bytes::Bytes;
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    BlobUnknown,
    ManifestUnknown,
    NameUnknown,
    NameInvalid,
    DigestInvalid,
    ManifestInvalid,
    Unauthorized,
    Denied,
    Unsupported,
    TooManyRequests,
    /// Not an OCI code; clients only look at the status (416) for ranges.
    RangeInvalid,
    /// Not an OCI code: the upstream could not be reached.
    Unavailable,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BlobUnknown => "BLOB_UNKNOWN",
            ErrorCode::ManifestUnknown => "MANIFEST_UNKNOWN",
            ErrorCode::NameUnknown => "NAME_UNKNOWN",
            ErrorCode::NameInvalid => "NAME_INVALID",
            ErrorCode::DigestInvalid => "DIGEST_INVALID",
            ErrorCode::ManifestInvalid => "MANIFEST_INVALID",
            ErrorCode::Unauthorized => "UNAUTHORIZED",
            ErrorCode::Denied => "DENIED",
            ErrorCode::Unsupported => "UNSUPPORTED",
            ErrorCode::TooManyRequests => "TOOMANYREQUESTS",
            ErrorCode::RangeInvalid => "RANGE_INVALID",
            ErrorCode::Unavailable => "UNAVAILABLE",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Serialize)]
struct Body<'a> {
    errors: [Entry<'a>; 1],
}

#[derive(Serialize)]
struct Entry<'a> {
    code: &'static str,
    message: &'a str,
    detail: Option<()>,
}

/// `{"errors":[{"code":"…","message":"…","detail":null}]}`.
pub fn error_body(code: ErrorCode, message: &str) -> Bytes {
    let body = Body { errors: [Entry { code: code.as_str(), message, detail: None }] };
    // Serializing plain strings cannot fail; the fallback only keeps this function total.
    match serde_json::to_vec(&body) {
        Ok(v) => Bytes::from(v),
        Err(_) => Bytes::from_static(br#"{"errors":[{"code":"UNKNOWN","message":"","detail":null}]}"#),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn body_shape() {
        let b = error_body(ErrorCode::ManifestUnknown, "manifest unknown");
        assert_eq!(&b[..], br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":null}]}"#);
    }

    #[test]
    fn message_is_escaped() {
        let msg = "quote \" backslash \\ newline \n nul \0 </script> é";
        let b = error_body(ErrorCode::NameInvalid, msg);
        let v: serde_json::Value = serde_json::from_slice(&b).expect("valid JSON");
        assert_eq!(v["errors"][0]["message"], msg);
        assert_eq!(v["errors"][0]["code"], "NAME_INVALID");
        assert!(v["errors"][0]["detail"].is_null());
    }

    #[test]
    fn codes() {
        assert_eq!(ErrorCode::TooManyRequests.as_str(), "TOOMANYREQUESTS");
        assert_eq!(ErrorCode::RangeInvalid.to_string(), "RANGE_INVALID");
        assert_eq!(ErrorCode::Unavailable.as_str(), "UNAVAILABLE");
    }
}
