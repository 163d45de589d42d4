//! Hostile requests: traversal in paths, bad digests and names, malformed or huge `Range`
//! headers, oversized headers. Each gets a 4xx (with an OCI error body where the request reached
//! the registry API), and nothing is created outside the data dir.

use damselfly_integration::{random_bytes, raw_http, walk_files, Mirror, MirrorOpts, RawResponse, Registry};

struct Case {
    what: &'static str,
    path: String,
    headers: String,
    /// The answer must carry an OCI error body (`errors[0].code`).
    oci_error_body: bool,
}

fn case(what: &'static str, path: impl Into<String>) -> Case {
    Case { what, path: path.into(), headers: String::new(), oci_error_body: true }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_paths_digests_and_headers_get_4xx_and_touch_nothing_outside_data_dir() {
    let origin = Registry::start().await.unwrap();
    let digest = origin.push_blob("test/x", random_bytes(100_000)).await.unwrap();
    let hex = digest.trim_start_matches("sha256:");

    // The data dir and a sentinel dir side by side: traversal out of the data dir would land in
    // (or next to) the sentinel.
    let root = tempfile::tempdir().unwrap();
    let data_dir = root.path().join("data");
    let sentinel = root.path().join("sentinel");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::create_dir_all(&sentinel).unwrap();
    std::fs::write(sentinel.join("keep"), b"untouched").unwrap();
    let mirror = Mirror::start(MirrorOpts::new(&origin.url()).data_dir(&data_dir)).await.unwrap();

    let blob = format!("/v2/test/x/blobs/{digest}");
    let many_ranges = (0..1500).map(|i| format!("{i}-{i}")).collect::<Vec<_>>().join(",");
    assert!(many_ranges.len() > 10 * 1024);
    let mut cases = vec![
        case("dot-dot segments", "/v2/../../etc/passwd"),
        case("encoded dot-dot", "/v2/%2e%2e/%2e%2e/etc/passwd"),
        case("encoded slashes out of the data dir", format!("/v2/..%2f..%2fsentinel/blobs/{digest}")),
        case("dot-dot after the name", format!("/v2/test/x/blobs/../../../../sentinel/{hex}")),
        case("encoded slash in the name", format!("/v2/a%2fb/blobs/{digest}")),
        case("upper-case name", format!("/v2/Test/X/blobs/{digest}")),
        case("digest with non-hex", "/v2/test/x/blobs/sha256:zzz"),
        case("digest too short", format!("/v2/test/x/blobs/sha256:{}", &hex[..63])),
        case("digest with traversal", "/v2/test/x/blobs/sha256:..%2f..%2f..%2fetc%2fpasswd"),
        case("unsupported algorithm", "/v2/test/x/blobs/md5:d41d8cd98f00b204e9800998ecf8427e"),
        case("manifest reference with traversal", "/v2/test/x/manifests/..%2f..%2fsentinel%2fkeep"),
    ];
    // Range on a real blob: reversed, not a number, and a 10 KiB list of ranges. A 416 has no
    // standard body, so only the status is checked.
    for (what, range) in [
        ("reversed range", "bytes=5-2".to_owned()),
        ("non-numeric range", "bytes=abc".to_owned()),
        ("10 KiB range", format!("bytes={many_ranges}")),
    ] {
        cases.push(Case { what, path: blob.clone(), headers: format!("Range: {range}\r\n"), oci_error_body: false });
    }

    for c in &cases {
        let request =
            format!("GET {} HTTP/1.1\r\nHost: {}\r\n{}Connection: close\r\n\r\n", c.path, mirror.host(), c.headers);
        let resp = raw_http(mirror.api_addr, request.as_bytes()).await.unwrap();
        let Some(resp) = resp else { panic!("{}: connection closed without a response", c.what) };
        assert_4xx(c.what, &resp);
        if c.oci_error_body {
            assert!(
                resp.oci_error_code().is_some(),
                "{}: no OCI error body: {}",
                c.what,
                String::from_utf8_lossy(&resp.body)
            );
        }
    }

    // A 64 KiB header: 431 (or any 4xx), or the connection is simply closed.
    let huge = format!(
        "GET {blob} HTTP/1.1\r\nHost: {}\r\nX-Big: {}\r\nConnection: close\r\n\r\n",
        mirror.host(),
        "a".repeat(64 * 1024)
    );
    if let Some(resp) = raw_http(mirror.api_addr, huge.as_bytes()).await.unwrap() {
        assert_4xx("64 KiB header", &resp);
    }

    // Still serving.
    let ok = raw_http(
        mirror.api_addr,
        format!("GET /v2/ HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n\r\n", mirror.host()).as_bytes(),
    )
    .await
    .unwrap()
    .expect("GET /v2/ answered");
    assert_eq!(ok.status, 200);

    // Nothing appeared next to the data dir or in the sentinel.
    let mut entries: Vec<_> =
        std::fs::read_dir(root.path()).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    entries.sort();
    assert_eq!(entries, ["data", "sentinel"], "files created outside the data dir");
    assert_eq!(walk_files(&sentinel), [sentinel.join("keep")]);
    assert_eq!(std::fs::read(sentinel.join("keep")).unwrap(), b"untouched");
}

fn assert_4xx(what: &str, resp: &RawResponse) {
    assert!(
        (400..500).contains(&resp.status),
        "{what}: expected 4xx, got {} {:?} {}",
        resp.status,
        resp.headers,
        String::from_utf8_lossy(&resp.body[..resp.body.len().min(500)])
    );
}
