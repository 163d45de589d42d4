//! What a peer's upload server reads from a stranger: the piece path and the bearer token.
//! A path is accepted only in its canonical form; a token never opens anything without a
//! valid MAC, whatever its shape.
#![no_main]

use damselfly_p2p::net::parse_piece_path;
use damselfly_proto::token;
use libfuzzer_sys::fuzz_target;

const DIGEST: &str = "sha256:0000000000000000000000000000000000000000000000000000000000000001";

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else { return };
    if let Some((digest, number)) = parse_piece_path(s) {
        assert_eq!(format!("/pieces/{digest}/{number}"), s);
    }
    let key = token::upload_key(b"fuzz-secret", "parent");
    // Inputs are not minted with this key, so nothing may verify, except by a forged MAC.
    if let Ok(child) = token::verify(&[key], s, DIGEST, 0) {
        assert_eq!(token::mint(&key, DIGEST, &child, s.split('.').nth(1).and_then(|e| e.parse().ok()).unwrap_or(0)), s);
    }
});
