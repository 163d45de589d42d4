//! nydusd's read pattern on a cold blob: the tail first (its table of contents), then 1 MiB
//! inclusive ranges. nydusd does not check 206/Content-Range, so both must be exact, and a cold
//! range must fetch only the pieces it covers, unless background fill (on seeds, always) is to
//! fetch the rest.

use std::time::Duration;

use damselfly_integration::{
    covered_pieces, fetch, http_client, piece_size, pieces_total_bytes, poll_until, random_bytes, Mirror, MirrorOpts,
    Registry, MIB,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nydus_tail_then_1mib_ranges_are_exact_and_fetch_only_covered_pieces() {
    let origin = Registry::start().await.unwrap();
    // Not piece-aligned: the 4100-byte tail straddles the last full piece and the short one.
    let len = 24 * MIB + 2000;
    let data = random_bytes(len as usize);
    let digest = origin.push_blob("test/nydus", data.clone()).await.unwrap();
    // No background fill: the origin byte count must reflect only what the ranges need.
    let mirror = Mirror::start(MirrorOpts::new(&origin.url()).background_fill(false)).await.unwrap();
    // nydusd in mirror mode sends no `ns`; it names the upstream with this header.
    let url = format!("{}/v2/test/nydus/blobs/{digest}", mirror.url());

    let mut ranges = vec![(len - 4100, len - 1)];
    ranges.extend((0..5).map(|i| (i * MIB, (i + 1) * MIB - 1)));
    let client = http_client();
    for &(first, last) in &ranges {
        let got = fetch(
            client
                .get(&url)
                .header("X-Dragonfly-Registry", origin.url())
                .header("Range", format!("bytes={first}-{last}")),
            true,
        )
        .await
        .unwrap();
        assert_eq!(got.status, 206, "bytes={first}-{last}: {:?}", got.headers);
        assert_eq!(got.header("content-range"), Some(format!("bytes {first}-{last}/{len}").as_str()));
        assert!(got.is_complete(), "bytes={first}-{last}: {:?}", got.outcome);
        let body = got.body.unwrap();
        assert!(body == data[first as usize..=last as usize], "wrong bytes for bytes={first}-{last}");
    }

    let piece = piece_size(len);
    let pieces = covered_pieces(&ranges, piece);
    let allowed = pieces_total_bytes(&pieces, len, piece);
    let log = origin.settled_access_log().await;
    let fetched = log.blob_get_bytes(&digest);
    assert!(
        fetched <= allowed,
        "origin served {fetched} blob bytes; the ranges cover pieces {pieces:?} = {allowed} bytes: {:#?}",
        log.matching(&digest)
    );
}

/// With background fill (asked for, or on a seed peer, where it is always on), one cold range
/// makes the node fetch the whole blob, so that later reads, and other nodes, hit the cache.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cold_range_fills_the_whole_blob_with_background_fill_and_on_seeds() {
    let origin = Registry::start().await.unwrap();
    let len = 12 * MIB + 77;
    let data = random_bytes(len as usize);
    let digest = origin.push_blob("test/fill", data.clone()).await.unwrap();
    for opts in
        [MirrorOpts::new(&origin.url()).background_fill(true), MirrorOpts::new(&origin.url()).with_scheduler().seed()]
    {
        let before = origin.settled_access_log().await.blob_get_bytes(&digest);
        let mirror = Mirror::start(opts).await.unwrap();
        let url = format!("{}/v2/test/fill/blobs/{digest}", mirror.url());
        let client = http_client();
        let range = |first: u64, last: u64| {
            client
                .get(&url)
                .header("X-Dragonfly-Registry", origin.url())
                .header("Range", format!("bytes={first}-{last}"))
        };
        let got = fetch(range(len - 4100, len - 1), true).await.unwrap();
        assert!(got.body.unwrap() == data[(len - 4100) as usize..]);
        let filled = poll_until("the whole blob to be fetched", Duration::from_secs(30), || async {
            let m = mirror.metrics().await?;
            Ok((m.sum("damselfly_fetched_bytes_total", &[("source", "origin")]) >= len as f64).then_some(()))
        })
        .await;
        filled.unwrap();
        let got = fetch(range(0, MIB - 1), true).await.unwrap();
        assert!(got.body.unwrap() == data[..MIB as usize]);
        let fetched = origin.settled_access_log().await.blob_get_bytes(&digest) - before;
        assert!(fetched <= len + 64 * 1024, "the origin served {fetched} bytes for a {len}-byte blob");
        mirror.shutdown().await;
    }
}
