//! What the control plane reads from the network: preheat requests on each endpoint (Harbor's
//! two protocols, the JSON API, registry notifications) and manifests from registries. Never
//! panics; a request it takes has a URL, bounded settings and no header but `Authorization`,
//! and its URL either names a registry the rules allow or is refused with a reason.
#![no_main]

use std::sync::OnceLock;

use damselfly_control::api::{read_request, Endpoint};
use damselfly_control::job::MAX_TIMEOUT;
use damselfly_control::resolve::{read_manifest, ImageRef, Manifest};
use damselfly_mirror::upstream::{Upstream, UpstreamConfig};
use libfuzzer_sys::fuzz_target;

fn upstream() -> &'static Upstream {
    static UPSTREAM: OnceLock<Upstream> = OnceLock::new();
    UPSTREAM.get_or_init(|| Upstream::new(UpstreamConfig::default()).expect("upstream"))
}

const DIGEST: &str = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";

fuzz_target!(|data: &[u8]| {
    let Some((&first, body)) = data.split_first() else { return };
    let endpoint = [Endpoint::OpenApi, Endpoint::Legacy, Endpoint::Api, Endpoint::Notification][usize::from(first % 4)];
    if let Ok(specs) = read_request(endpoint, body) {
        for spec in specs {
            assert!(!spec.url.is_empty());
            assert!(spec.concurrency >= 1 && spec.timeout <= MAX_TIMEOUT);
            assert!(spec.headers.keys().all(|k| k.eq_ignore_ascii_case("authorization")));
            if let Ok(image) = ImageRef::parse(&spec.url, spec.target, upstream()) {
                assert!(!image.repository.is_empty() && !image.reference.is_empty());
            }
        }
    }
    let platforms = [String::from("linux/amd64")];
    for wanted in [&[][..], &platforms[..]] {
        match read_manifest(body, "", DIGEST, wanted) {
            Ok(Manifest::Index(chosen)) => assert!(!chosen.is_empty()),
            Ok(Manifest::Image(blobs)) => assert!(blobs.iter().all(|b| b.digest.starts_with("sha256:"))),
            Err(_) => {}
        }
    }
});
