//! `parse_range` on a `Range` header value, then `RangeSpec::resolve` against lengths around
//! the parsed bounds: a resolved range is never empty and never leaves the representation.
#![no_main]

use damselfly_mirror::oci::{content_range, parse_range, RangeSpec};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(header) = std::str::from_utf8(data) else { return };
    let spec = match parse_range(header) {
        Ok(Some(spec)) => spec,
        Ok(None) => return,
        Err(e) => {
            let _ = e.status_and_code();
            return;
        }
    };
    // Written out canonically it parses to the same spec.
    let canonical = match spec {
        RangeSpec::FromTo(a, b) => {
            assert!(a <= b);
            format!("bytes={a}-{b}")
        }
        RangeSpec::From(a) => format!("bytes={a}-"),
        RangeSpec::Suffix(n) => format!("bytes=-{n}"),
    };
    assert_eq!(parse_range(&canonical), Ok(Some(spec)));

    let (x, y) = match spec {
        RangeSpec::FromTo(a, b) => (a, b),
        RangeSpec::From(a) | RangeSpec::Suffix(a) => (a, a),
    };
    let mut lens = vec![0, 1, 2, 4 << 20, u64::MAX - 1, u64::MAX];
    for v in [x, y] {
        lens.extend([v.saturating_sub(1), v, v.saturating_add(1), v.saturating_add(2)]);
    }
    for len in lens {
        let Some(r) = spec.resolve(len) else { continue };
        assert!(r.start < r.end, "{spec:?} resolved against {len} to empty {r:?}");
        assert!(r.end <= len, "{spec:?} resolved against {len} to {r:?}");
        match spec {
            RangeSpec::FromTo(a, _) | RangeSpec::From(a) => assert_eq!(r.start, a),
            RangeSpec::Suffix(n) => assert_eq!(r.end - r.start, n.min(len)),
        }
        let _ = content_range(&r, len);
    }
});
