//! `WWW-Authenticate` parsing: never fails, and every challenge it returns is well formed and
//! reads back to itself from its own header form, alone and in a list.
#![no_main]

use damselfly_mirror::upstream::challenge::parse;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = std::str::from_utf8(data) else { return };
    let challenges = parse(value);
    for ch in &challenges {
        assert!(!ch.scheme.is_empty());
        assert_eq!(ch.scheme, ch.scheme.to_ascii_lowercase());
        for (k, _) in &ch.params {
            assert!(!k.is_empty());
            assert_eq!(*k, k.to_ascii_lowercase());
        }
        let written = ch.to_string();
        assert_eq!(parse(&written), vec![ch.clone()], "{written:?} does not read back");
    }
    let joined = challenges.iter().map(|c| c.to_string()).collect::<Vec<_>>().join(", ");
    assert_eq!(parse(&joined), challenges, "{joined:?} does not read back");
});
