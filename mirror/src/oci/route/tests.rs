use super::*;
use proptest::prelude::*;

const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

fn digest() -> Digest {
    Digest::parse(&format!("sha256:{HEX}")).expect("digest")
}

fn kind(path: &str) -> Result<RouteKind, RouteError> {
    parse_route(path, None).map(|r| r.kind)
}

#[test]
fn base() {
    assert_eq!(kind("/v2/"), Ok(RouteKind::Base));
    assert_eq!(kind("/v2"), Ok(RouteKind::Base));
    assert_eq!(kind("/v2//"), Err(RouteError::EmptySegment));
    assert_eq!(kind("/v2x/"), Err(RouteError::NotFound));
    assert_eq!(kind("/"), Err(RouteError::NotFound));
    assert_eq!(kind(""), Err(RouteError::NotFound));
    assert_eq!(kind("/healthy"), Err(RouteError::NotFound));
}

#[test]
fn manifests_and_blobs() {
    let m = kind("/v2/library/alpine/manifests/3.19").expect("manifest");
    assert_eq!(m, RouteKind::Manifest { name: "library/alpine".into(), reference: Reference::Tag("3.19".into()) });
    let m = kind(&format!("/v2/a/manifests/sha256:{HEX}")).expect("manifest by digest");
    assert_eq!(m, RouteKind::Manifest { name: "a".into(), reference: Reference::Digest(digest()) });
    let b = kind(&format!("/v2/a/b/c/blobs/sha256%3A{HEX}")).expect("blob, encoded colon");
    assert_eq!(b, RouteKind::Blob { name: "a/b/c".into(), digest: digest() });
}

#[test]
fn last_marker_wins() {
    let m = kind("/v2/foo/manifests/bar/manifests/latest").expect("manifest");
    assert_eq!(m, RouteKind::Manifest { name: "foo/manifests/bar".into(), reference: Reference::Tag("latest".into()) });
    let b = kind(&format!("/v2/x/manifests/blobs/sha256:{HEX}")).expect("blob");
    assert_eq!(b, RouteKind::Blob { name: "x/manifests".into(), digest: digest() });
    let m = kind("/v2/x/blobs/y/manifests/t").expect("manifest");
    assert!(matches!(m, RouteKind::Manifest { ref name, .. } if name == "x/blobs/y"));
}

#[test]
fn unsupported_operations() {
    for p in [
        "/v2/x/tags/list",
        "/v2/_catalog",
        "/v2/x/blobs/uploads/",
        "/v2/x/blobs/uploads",
        "/v2/x/blobs/uploads/1234-abcd",
        "/v2/x/manifests/",
        "/v2/x/manifests/latest/",
        &format!("/v2/x/referrers/sha256:{HEX}"),
    ] {
        assert_eq!(kind(p), Err(RouteError::Unsupported), "{p}");
    }
}

#[test]
fn hostile_paths_are_rejected() {
    use RouteError::*;
    let long = format!("/v2/{}/manifests/latest", "a/".repeat(1100));
    let cases: &[(&str, RouteError)] = &[
        ("/v2/../etc/passwd", DotSegment),
        ("/v2/a/../b/manifests/latest", DotSegment),
        ("/v2/a/./b/manifests/latest", DotSegment),
        ("/v2/a/%2e%2e/manifests/latest", ForbiddenEncoding),
        ("/v2/a/%2E/manifests/latest", ForbiddenEncoding),
        ("/v2/a%2fb/manifests/latest", ForbiddenEncoding),
        ("/v2/a%2Fb/manifests/latest", ForbiddenEncoding),
        ("/v2/a%5cb/manifests/latest", ForbiddenEncoding),
        ("/v2/a%00/manifests/latest", ForbiddenEncoding),
        ("/v2/a%252e/manifests/latest", ForbiddenEncoding),
        ("/v2/a\\b/manifests/latest", ForbiddenChar),
        ("/v2/a\0/manifests/latest", ForbiddenChar),
        ("/v2/a%0a/manifests/latest", ForbiddenChar),
        ("/v2/a//b/manifests/latest", EmptySegment),
        ("/v2/a/manifests//latest", EmptySegment),
        ("/v2/a%zz/manifests/latest", BadEncoding),
        ("/v2/a%2/manifests/latest", BadEncoding),
        ("/v2/a/manifests/latest%", BadEncoding),
        ("/v2/a%ff/manifests/latest", BadEncoding),
        (&long, TooLong),
    ];
    for (path, want) in cases {
        assert_eq!(kind(path).as_ref(), Err(want), "{path}");
    }
}

#[test]
fn names_follow_the_grammar() {
    for ok in ["a", "a/b", "library/alpine", "a.b", "a_b", "a__b", "a-b", "a---b", "0/1", "a.b_c-d/e__f"] {
        assert!(is_valid_name(ok), "{ok}");
    }
    for bad in ["", "A", "a/", "/a", "a//b", "-a", "a-", "a.", "a._b", "a___b", "a..b", "a b", "é", "a/B"] {
        assert!(!is_valid_name(bad), "{bad}");
    }
    assert!(is_valid_name(&"a".repeat(255)));
    assert!(!is_valid_name(&"a".repeat(256)));
    assert_eq!(kind("/v2/Alpine/manifests/latest"), Err(RouteError::InvalidName));
}

#[test]
fn tags_and_digests() {
    for ok in ["latest", "_", "v1.2.3-rc_1", "A", &"a".repeat(128)] {
        assert!(is_valid_tag(ok), "{ok}");
    }
    for bad in ["", ".a", "-a", "a+b", "a/b", &"a".repeat(129)] {
        assert!(!is_valid_tag(bad), "{bad}");
    }
    assert_eq!(kind("/v2/a/manifests/-bad"), Err(RouteError::InvalidTag));
    assert!(matches!(kind("/v2/a/manifests/sha256:abc"), Err(RouteError::InvalidDigest(_))));
    assert!(matches!(kind("/v2/a/manifests/md5:abc"), Err(RouteError::InvalidDigest(_))));
    assert!(matches!(kind("/v2/a/blobs/latest"), Err(RouteError::InvalidDigest(_))));
    let upper = format!("/v2/a/blobs/sha256:{}", HEX.to_uppercase());
    assert!(matches!(kind(&upper), Err(RouteError::InvalidDigest(_))));
}

#[test]
fn ns_parameter() {
    let ns = |q: &str| parse_route("/v2/", Some(q)).map(|r| r.ns);
    assert_eq!(ns("ns=docker.io"), Ok(Some("docker.io".into())));
    assert_eq!(ns("a=b&ns=127.0.0.1%3A5000&c"), Ok(Some("127.0.0.1:5000".into())));
    assert_eq!(ns("ns=%5B::1%5D:5000"), Ok(Some("[::1]:5000".into())));
    assert_eq!(ns("other=1"), Ok(None));
    assert_eq!(ns(""), Ok(None));
    for bad in ["ns=", "ns", "ns=a/b", "ns=u%40host", "ns=a%20b", "ns=https://x", "ns=a&ns=b", "ns=%ff", "ns=x:0"] {
        assert_eq!(ns(bad), Err(RouteError::InvalidNs), "{bad}");
    }
}

#[test]
fn host_port() {
    for ok in ["docker.io", "localhost", "localhost:5000", "127.0.0.1:5000", "[::1]", "[::1]:443", "A-b.example.com"] {
        assert!(is_host_port(ok), "{ok}");
    }
    for bad in
        ["", ":5000", "a:", "a:0", "a:65536", "a:+1", "::1", "[::1", "[x]:1", "a..b", "a.", "-a", "a_b", "a b", "a@b"]
    {
        assert!(!is_host_port(bad), "{bad}");
    }
}

#[test]
fn errors_map_to_oci_codes() {
    use http::StatusCode as S;
    assert_eq!(RouteError::InvalidName.status_and_code(), (S::BAD_REQUEST, ErrorCode::NameInvalid));
    assert_eq!(RouteError::InvalidTag.status_and_code(), (S::BAD_REQUEST, ErrorCode::ManifestInvalid));
    let d = RouteError::InvalidDigest(DigestError::MissingAlgorithm);
    assert_eq!(<(S, ErrorCode)>::from(&d), (S::BAD_REQUEST, ErrorCode::DigestInvalid));
    assert_eq!(RouteError::Unsupported.status_and_code(), (S::NOT_FOUND, ErrorCode::Unsupported));
    assert_eq!(RouteError::NotFound.status_and_code().0, S::NOT_FOUND);
}

fn name_strategy() -> impl Strategy<Value = String> {
    let component = "[a-z0-9]{1,5}((\\.|_|__|-{1,3})[a-z0-9]{1,5}){0,3}";
    prop::collection::vec(component, 1..4).prop_map(|c| c.join("/"))
}

proptest! {
    #[test]
    fn never_panics(path in "\\PC{0,300}", query in proptest::option::of("\\PC{0,60}")) {
        let _ = parse_route(&path, query.as_deref());
    }

    #[test]
    fn never_panics_on_plausible_paths(path in "/v2/[a-z0-9./%_:-]{0,80}(/manifests/|/blobs/)?[a-zA-Z0-9.:%_-]{0,70}") {
        let _ = parse_route(&path, None);
    }

    #[test]
    fn valid_routes_round_trip(name in name_strategy(), tag in "[a-zA-Z0-9_][a-zA-Z0-9._-]{0,127}", hex in "[0-9a-f]{64}") {
        let got = kind(&format!("/v2/{name}/manifests/{tag}"));
        prop_assert_eq!(got, Ok(RouteKind::Manifest { name: name.clone(), reference: Reference::Tag(tag) }));
        let d = Digest::parse(&format!("sha256:{hex}")).expect("digest");
        let got = kind(&format!("/v2/{name}/blobs/{d}"));
        prop_assert_eq!(got, Ok(RouteKind::Blob { name: name.clone(), digest: d.clone() }));
        let got = kind(&format!("/v2/{name}/manifests/{d}"));
        prop_assert_eq!(got, Ok(RouteKind::Manifest { name, reference: Reference::Digest(d) }));
    }

    #[test]
    fn dot_dot_segments_are_rejected(
        before in prop::collection::vec("[a-z0-9.%]{0,6}", 0..4),
        after in prop::collection::vec("[a-z0-9.%]{0,6}", 0..4),
        tail in prop::sample::select(vec!["", "/manifests/latest", "/blobs/sha256:00"]),
    ) {
        let mut segs = before;
        segs.push("..".into());
        segs.extend(after);
        let path = format!("/v2/{}{tail}", segs.join("/"));
        prop_assert!(parse_route(&path, None).is_err(), "{}", path);
    }
}
