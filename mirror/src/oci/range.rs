//! `Range` request headers (RFC 9110 §14), as far as pull clients use them: one range per
//! request (containerd's `bytes=N-`, nydusd's inclusive `bytes=a-b`).

use std::ops::Range;

use http::StatusCode;

use super::error::ErrorCode;

pub const MAX_RANGE_HEADER_LEN: usize = 1024;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RangeSpec {
    /// `bytes=a-b`, both ends inclusive.
    FromTo(u64, u64),
    /// `bytes=a-`.
    From(u64),
    /// `bytes=-n`: the last n bytes.
    Suffix(u64),
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RangeError {
    #[error("Range header is longer than {MAX_RANGE_HEADER_LEN} bytes")]
    TooLong,
    #[error("Range header is malformed")]
    Malformed,
    #[error("Range position does not fit in 64 bits")]
    Overflow,
    #[error("Range end is before its start")]
    Inverted,
}

impl RangeError {
    pub fn status_and_code(&self) -> (StatusCode, ErrorCode) {
        (StatusCode::RANGE_NOT_SATISFIABLE, ErrorCode::RangeInvalid)
    }
}

/// `Ok(None)` means "ignore the header and send the whole body", which RFC 9110 allows for
/// any range request: used for other units and for multi-range requests, which only
/// containers-image's zstd:chunked sends and which then falls back to whole blobs.
pub fn parse_range(header: &str) -> Result<Option<RangeSpec>, RangeError> {
    if header.len() > MAX_RANGE_HEADER_LEN {
        return Err(RangeError::TooLong);
    }
    let (unit, set) = header.trim().split_once('=').ok_or(RangeError::Malformed)?;
    if !unit.trim().eq_ignore_ascii_case("bytes") {
        return Ok(None);
    }
    if set.contains(',') {
        return Ok(None);
    }
    let (first, last) = set.trim().split_once('-').ok_or(RangeError::Malformed)?;
    let spec = match (first.is_empty(), last.is_empty()) {
        (true, true) => return Err(RangeError::Malformed),
        (true, false) => RangeSpec::Suffix(number(last)?),
        (false, true) => RangeSpec::From(number(first)?),
        (false, false) => {
            let (a, b) = (number(first)?, number(last)?);
            if b < a {
                return Err(RangeError::Inverted);
            }
            RangeSpec::FromTo(a, b)
        }
    };
    Ok(Some(spec))
}

/// Digits only: `str::parse` would also take a leading `+`, which the grammar does not allow.
fn number(s: &str) -> Result<u64, RangeError> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RangeError::Malformed);
    }
    s.parse().map_err(|_| RangeError::Overflow)
}

impl RangeSpec {
    /// The byte range to send from a representation of `len` bytes, or `None` when the range
    /// is unsatisfiable (answer 416 with `Content-Range: bytes */len`).
    pub fn resolve(&self, len: u64) -> Option<Range<u64>> {
        let last = len.checked_sub(1)?;
        match *self {
            RangeSpec::FromTo(a, b) if a <= b && a < len => Some(a..b.min(last) + 1),
            RangeSpec::From(a) if a < len => Some(a..len),
            RangeSpec::Suffix(n) if n > 0 => Some(len.saturating_sub(n)..len),
            _ => None,
        }
    }
}

/// `Content-Range` for a 206: `bytes a-b/len` with `b` inclusive.
pub fn content_range(r: &Range<u64>, len: u64) -> String {
    format!("bytes {}-{}/{}", r.start, r.end.saturating_sub(1).max(r.start), len)
}

/// `Content-Range` for a 416.
pub fn unsatisfied_content_range(len: u64) -> String {
    format!("bytes */{len}")
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn parses_single_ranges() {
        assert_eq!(parse_range("bytes=0-1023"), Ok(Some(RangeSpec::FromTo(0, 1023))));
        assert_eq!(parse_range("bytes=5-"), Ok(Some(RangeSpec::From(5))));
        assert_eq!(parse_range("bytes=-500"), Ok(Some(RangeSpec::Suffix(500))));
        assert_eq!(parse_range(" Bytes = 7-7 "), Ok(Some(RangeSpec::FromTo(7, 7))));
        assert_eq!(parse_range("bytes=-0"), Ok(Some(RangeSpec::Suffix(0))));
        let max = format!("bytes={}-", u64::MAX);
        assert_eq!(parse_range(&max), Ok(Some(RangeSpec::From(u64::MAX))));
    }

    #[test]
    fn ignores_what_it_may_ignore() {
        assert_eq!(parse_range("bytes=0-1,5-6"), Ok(None));
        assert_eq!(parse_range("bytes=0-1,"), Ok(None));
        assert_eq!(parse_range("items=0-1"), Ok(None));
    }

    #[test]
    fn rejects_malformed() {
        assert_eq!(parse_range("bytes=5-2"), Err(RangeError::Inverted));
        for bad in [
            "bytes=abc",
            "bytes=",
            "bytes=-",
            "bytes=1",
            "bytes=+1-2",
            "bytes=1-+2",
            "bytes=1 -2",
            "garbage",
            "bytes=a-b",
        ] {
            assert_eq!(parse_range(bad), Err(RangeError::Malformed), "{bad}");
        }
        assert_eq!(parse_range("bytes=18446744073709551616-"), Err(RangeError::Overflow));
        assert_eq!(parse_range("bytes=0-99999999999999999999999"), Err(RangeError::Overflow));
        let long = format!("bytes=0-{}", "1".repeat(MAX_RANGE_HEADER_LEN));
        assert_eq!(parse_range(&long), Err(RangeError::TooLong));
        assert_eq!(
            RangeError::Malformed.status_and_code(),
            (StatusCode::RANGE_NOT_SATISFIABLE, ErrorCode::RangeInvalid)
        );
    }

    #[test]
    fn resolves() {
        assert_eq!(RangeSpec::FromTo(0, 9).resolve(100), Some(0..10));
        assert_eq!(RangeSpec::FromTo(90, 200).resolve(100), Some(90..100));
        assert_eq!(RangeSpec::FromTo(100, 200).resolve(100), None);
        assert_eq!(RangeSpec::FromTo(5, 2).resolve(100), None);
        assert_eq!(RangeSpec::From(99).resolve(100), Some(99..100));
        assert_eq!(RangeSpec::From(100).resolve(100), None);
        assert_eq!(RangeSpec::Suffix(10).resolve(100), Some(90..100));
        assert_eq!(RangeSpec::Suffix(1000).resolve(100), Some(0..100));
        assert_eq!(RangeSpec::Suffix(0).resolve(100), None);
        assert_eq!(RangeSpec::From(0).resolve(0), None);
        assert_eq!(RangeSpec::Suffix(5).resolve(0), None);
        assert_eq!(RangeSpec::FromTo(0, u64::MAX).resolve(u64::MAX), Some(0..u64::MAX));
    }

    #[test]
    fn content_range_headers() {
        assert_eq!(content_range(&(0..10), 100), "bytes 0-9/100");
        assert_eq!(content_range(&(99..100), 100), "bytes 99-99/100");
        assert_eq!(unsatisfied_content_range(100), "bytes */100");
    }

    fn spec() -> impl Strategy<Value = RangeSpec> {
        prop_oneof![
            (any::<u64>(), any::<u64>()).prop_map(|(a, b)| RangeSpec::FromTo(a, b)),
            any::<u64>().prop_map(RangeSpec::From),
            any::<u64>().prop_map(RangeSpec::Suffix),
            (0u64..200, 0u64..200).prop_map(|(a, b)| RangeSpec::FromTo(a, b)),
            (0u64..200).prop_map(RangeSpec::Suffix),
        ]
    }

    proptest! {
        #[test]
        fn parse_never_panics(s in "\\PC{0,64}") {
            let _ = parse_range(&s);
        }

        #[test]
        fn parse_never_panics_on_near_misses(s in "bytes=[0-9]{0,22}-?[0-9]{0,22}(,[0-9-]{0,4})?") {
            let _ = parse_range(&s);
        }

        #[test]
        fn resolve_stays_in_bounds(spec in spec(), len in prop_oneof![any::<u64>(), 0u64..300]) {
            if let Some(r) = spec.resolve(len) {
                prop_assert!(r.start < r.end && r.end <= len, "{:?} {} -> {:?}", spec, len, r);
                let _ = content_range(&r, len);
            }
        }

        #[test]
        fn from_to_resolves_exactly(a in any::<u64>(), b in any::<u64>(), len in any::<u64>()) {
            let (a, b) = (a.min(b), a.max(b));
            prop_assume!(b < len);
            prop_assert_eq!(RangeSpec::FromTo(a, b).resolve(len), Some(a..b + 1));
        }

        #[test]
        fn parsed_from_to_round_trips(a in any::<u64>(), b in any::<u64>()) {
            let (a, b) = (a.min(b), a.max(b));
            prop_assert_eq!(parse_range(&format!("bytes={a}-{b}")), Ok(Some(RangeSpec::FromTo(a, b))));
        }
    }
}
