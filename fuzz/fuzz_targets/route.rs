//! `parse_route(path, query)`: the request target as hyper hands it over, split at the first
//! `?`. Besides not panicking, whatever is accepted must be canonical: it satisfies the
//! name/tag/ns grammars and reads back to the same route when written out again; a registry
//! read from the name's first component is spelled back to that component, and what follows
//! it is a repository name.
#![no_main]

use damselfly_mirror::oci::route::{is_host_port, is_valid_name, is_valid_tag};
use damselfly_mirror::oci::{parse_route, registry_prefix, Reference, Route, RouteKind};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(target) = std::str::from_utf8(data) else { return };
    let (path, query) = match target.split_once('?') {
        Some((p, q)) => (p, Some(q)),
        None => (target, None),
    };
    match parse_route(path, query) {
        Ok(route) => check(&route),
        Err(e) => {
            let _ = e.status_and_code();
            let _ = e.to_string();
        }
    }
});

fn check(route: &Route) {
    let path = match &route.kind {
        RouteKind::Base => "/v2/".to_owned(),
        RouteKind::Manifest { name, reference } => {
            assert!(is_valid_name(name), "accepted name {name:?}");
            check_prefix(name);
            if let Reference::Tag(t) = reference {
                assert!(is_valid_tag(t), "accepted tag {t:?}");
            }
            format!("/v2/{name}/manifests/{reference}")
        }
        RouteKind::Blob { name, digest } => {
            assert!(is_valid_name(name), "accepted name {name:?}");
            check_prefix(name);
            format!("/v2/{name}/blobs/{digest}")
        }
    };
    if let Some(ns) = &route.ns {
        assert!(is_host_port(ns), "accepted ns {ns:?}");
    }
    let query = route.ns.as_ref().map(|ns| format!("ns={ns}"));
    let again = parse_route(&path, query.as_deref()).expect("a written-out route parses");
    assert_eq!(&again, route, "route does not round-trip through {path:?} {query:?}");
}

fn check_prefix(name: &str) {
    if let Some((host_port, repo)) = registry_prefix::split(name) {
        assert!(is_valid_name(repo), "{name:?}: the rest {repo:?} is not a name");
        let first = name.split('/').next().unwrap_or_default();
        assert_eq!(registry_prefix::spell(&host_port).as_deref(), Some(first), "{name:?} read as {host_port:?}");
    }
}
