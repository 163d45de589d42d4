//! `Digest::parse`: what it accepts is exactly its own canonical form (it becomes a file name
//! in the piece store, so two spellings of one digest must not exist).
#![no_main]

use damselfly_proto::{Algorithm, Digest};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    let Ok(d) = Digest::parse(s) else { return };
    assert_eq!(d.to_string(), s);
    let hex_len = match d.algorithm() {
        Algorithm::Sha256 => 64,
        Algorithm::Sha512 => 128,
    };
    assert_eq!(d.hex().len(), hex_len);
    assert!(d.hex().bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f')));
    assert!(!d.hex().contains('/') && !d.hex().contains('.'));
    assert_eq!(s.parse::<Digest>().as_ref(), Ok(&d));
});
