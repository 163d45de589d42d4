//! Tests of the store and fetch engine together, against an in-memory source that can fail in
//! the ways a real origin cannot be made to on demand.

use std::ops::Range;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use futures_util::future::BoxFuture;
use futures_util::{stream, StreamExt};

use crate::*;

const MIB: usize = 1 << 20;

#[derive(Default)]
pub(crate) struct Faults {
    ignore_range: bool,
    /// Cut the stream after this many bytes, this many times.
    cut_after: Option<(usize, usize)>,
    corrupt: bool,
    /// Pause before each 64 KiB chunk, so that other readers run while the stream is open.
    chunk_delay: Option<std::time::Duration>,
}

pub(crate) struct MemSource {
    data: Bytes,
    faults: Mutex<Faults>,
    requests: Mutex<Vec<Option<Range<u64>>>>,
    sent: AtomicUsize,
    /// Bytes the fetch has taken out of the bodies so far.
    taken: Arc<AtomicUsize>,
}

impl MemSource {
    pub(crate) fn new(data: Bytes, faults: Faults) -> Arc<Self> {
        let (requests, sent, taken) = (Mutex::default(), AtomicUsize::new(0), Arc::default());
        Arc::new(MemSource { data, faults: Mutex::new(faults), requests, sent, taken })
    }
}

impl Source for MemSource {
    fn fetch(&self, range: Option<Range<u64>>) -> BoxFuture<'static, Result<SourceResponse, SourceError>> {
        self.requests.lock().unwrap().push(range.clone());
        let mut f = self.faults.lock().unwrap();
        let honoured = range.is_some() && !f.ignore_range;
        let r = if honoured { range.unwrap() } else { 0..self.data.len() as u64 };
        let mut body = self.data.slice(r.start as usize..r.end as usize);
        if f.corrupt {
            let mut v = body.to_vec();
            let mid = v.len() / 2;
            v[mid] ^= 1;
            body = Bytes::from(v);
        }
        let mut cut = false;
        if let Some((after, times)) = f.cut_after {
            if times > 0 && body.len() > after {
                body = body.slice(..after);
                cut = true;
                f.cut_after = Some((after, times - 1));
            }
        }
        self.sent.fetch_add(body.len(), Ordering::SeqCst);
        let chunks: Vec<Result<Bytes, SourceError>> =
            body.chunks(64 << 10).map(|c| Ok(Bytes::copy_from_slice(c))).collect();
        let mut s: Vec<_> = chunks;
        if cut {
            s.push(Err(SourceError::retryable("connection reset")));
        }
        let delay = f.chunk_delay;
        let taken = self.taken.clone();
        let body = stream::iter(s)
            .then(move |c| {
                let taken = taken.clone();
                async move {
                    if let Some(d) = delay {
                        tokio::time::sleep(d).await;
                    }
                    if let Ok(b) = &c {
                        taken.fetch_add(b.len(), Ordering::SeqCst);
                    }
                    c
                }
            })
            .boxed();
        Box::pin(async move { Ok(SourceResponse { range_honoured: honoured, body }) })
    }
}

pub(crate) fn blob(len: usize) -> (Bytes, Digest) {
    let mut v = vec![0u8; len];
    let mut x: u32 = 0x9e3779b9 ^ len as u32;
    for b in v.iter_mut() {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        *b = x as u8;
    }
    let d = Digest::of(Algorithm::Sha256, &v);
    (Bytes::from(v), d)
}

/// Changes bytes in place, as a failing disk or a lost write would; never truncates, because a
/// piece hasher of the previous store may still be reading the file through its map.
fn overwrite(path: &std::path::Path, offset: usize, bytes: &[u8]) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(bytes, offset as u64).unwrap();
}

pub(crate) fn open(dir: &std::path::Path, quota: u64) -> Store {
    open_capped(dir, quota, DEFAULT_MAX_TASKS)
}

fn open_capped(dir: &std::path::Path, quota: u64, max_tasks: usize) -> Store {
    let cfg = StoreConfig { dir: dir.to_owned(), quota, direct_io: true, max_tasks };
    Store::open(cfg, Arc::new(Metrics::default())).unwrap()
}

/// Reads all of `data` into the store, from a source that does as asked.
async fn cache_whole(store: &Store, data: &Bytes, d: &Digest) {
    let src = MemSource::new(data.clone(), Faults::default());
    let t = store.get_or_create(d, data.len() as u64, None).unwrap();
    collect(t, 0..data.len() as u64, Delivery::Whole, src).await.unwrap();
}

pub(crate) async fn collect(
    task: TaskRef,
    range: Range<u64>,
    delivery: Delivery,
    src: Arc<MemSource>,
) -> Result<Vec<u8>, ReadError> {
    let mut out = Vec::new();
    let mut s = Box::pin(read(task, range, delivery, src));
    while let Some(b) = s.next().await {
        out.extend_from_slice(&b?);
    }
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_cold_readers_share_one_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let (data, d) = blob(10 * MIB + 123);
    let src = MemSource::new(data.clone(), Faults::default());
    let mut joins = Vec::new();
    for _ in 0..8 {
        let t = store.get_or_create(&d, data.len() as u64, None).unwrap();
        let (src, len) = (src.clone(), data.len() as u64);
        joins.push(tokio::spawn(async move { collect(t, 0..len, Delivery::Whole, src).await }));
    }
    for j in joins {
        assert!(j.await.unwrap().unwrap() == data);
    }
    assert_eq!(src.requests.lock().unwrap().as_slice(), &[None]);
    assert!(store.get(&d).unwrap().unwrap().is_verified());
}

#[tokio::test]
async fn range_read_fetches_only_covered_pieces() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let (data, d) = blob(20 * MIB);
    let src = MemSource::new(data.clone(), Faults::default());
    let t = store.get_or_create(&d, data.len() as u64, None).unwrap();
    let r = (5 * MIB) as u64..(6 * MIB) as u64;
    let got = collect(t.clone(), r.clone(), Delivery::Part, src.clone()).await.unwrap();
    assert!(got == data[5 * MIB..6 * MIB]);
    assert_eq!(src.sent.load(Ordering::SeqCst), 4 * MIB);
    // The same piece again comes from disk.
    collect(t, r, Delivery::Part, src.clone()).await.unwrap();
    assert_eq!(src.requests.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn source_ignoring_range_is_read_once_whole() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let (data, d) = blob(9 * MIB);
    let src = MemSource::new(data.clone(), Faults { ignore_range: true, ..Faults::default() });
    let t = store.get_or_create(&d, data.len() as u64, None).unwrap();
    let got = collect(t.clone(), (5 * MIB) as u64..(5 * MIB + 10) as u64, Delivery::Part, src.clone()).await.unwrap();
    assert!(got == data[5 * MIB..5 * MIB + 10]);
    let full = collect(t.clone(), 0..data.len() as u64, Delivery::Whole, src.clone()).await.unwrap();
    assert!(full == data);
    assert_eq!(src.requests.lock().unwrap().len(), 1);
    assert!(t.is_verified());
}

/// Regression: when a range fetch found out the source ignores ranges and restarted at offset 0,
/// its progress still said "written up to the range start", and a concurrent full reader was
/// handed the sparse file's zeros for the pieces before it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn full_read_during_a_range_ignoring_fetch_gets_the_right_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let (data, d) = blob(12 * MIB);
    let faults =
        Faults { ignore_range: true, chunk_delay: Some(std::time::Duration::from_millis(1)), ..Faults::default() };
    let src = MemSource::new(data.clone(), faults);
    let t = store.get_or_create(&d, data.len() as u64, None).unwrap();
    let len = data.len() as u64;
    let ranged = tokio::spawn(collect(t.clone(), (8 * MIB) as u64..(8 * MIB + 10) as u64, Delivery::Part, src.clone()));
    let full = collect(t.clone(), 0..len, Delivery::Whole, src.clone()).await.unwrap();
    assert!(full == data, "a full read got other bytes than the content");
    assert!(ranged.await.unwrap().unwrap() == data[8 * MIB..8 * MIB + 10]);
    // The full reader may claim the first pieces before the range fetch learns that the source
    // ignores ranges; then both read the stream once, each writing only its own pieces.
    let requests = src.requests.lock().unwrap().len();
    assert!(requests <= 2, "{requests} source requests");
}

#[tokio::test]
async fn a_cut_stream_is_resumed_by_range() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let (data, d) = blob(9 * MIB);
    let src = MemSource::new(data.clone(), Faults { cut_after: Some((3 * MIB + 5, 2)), ..Faults::default() });
    let t = store.get_or_create(&d, data.len() as u64, None).unwrap();
    let got = collect(t.clone(), 0..data.len() as u64, Delivery::Whole, src.clone()).await.unwrap();
    assert!(got == data);
    let reqs = src.requests.lock().unwrap().clone();
    assert_eq!(reqs[0], None);
    assert_eq!(reqs[1], Some((3 * MIB + 5) as u64..data.len() as u64));
    assert!(t.is_verified());
    // The resumed stream starts mid-page: its head went through the page cache, its body past it.
    assert!(std::fs::read(data_file(dir.path(), &d)).unwrap() == data, "the file on disk differs");
}

pub(crate) fn data_file(dir: &std::path::Path, d: &Digest) -> std::path::PathBuf {
    dir.join("tasks/sha256").join(format!("{}.data", d.hex()))
}

/// Without `O_DIRECT` (turned off, or refused by the filesystem) the same fills go through the
/// page cache.
#[tokio::test]
async fn without_direct_io_fills_go_through_the_page_cache() {
    let dir = tempfile::tempdir().unwrap();
    let (data, d) = blob(9 * MIB + 11);
    let src = MemSource::new(data.clone(), Faults { cut_after: Some((5 * MIB + 3, 1)), ..Faults::default() });
    {
        let cfg =
            StoreConfig { dir: dir.path().to_owned(), quota: 1 << 30, direct_io: false, max_tasks: DEFAULT_MAX_TASKS };
        let store = Store::open(cfg, Arc::new(Metrics::default())).unwrap();
        let t = store.get_or_create(&d, data.len() as u64, None).unwrap();
        assert!(collect(t.clone(), 0..data.len() as u64, Delivery::Whole, src.clone()).await.unwrap() == data);
        assert!(t.is_verified());
        store.flush_all();
    }
    assert!(std::fs::read(data_file(dir.path(), &d)).unwrap() == data, "the file on disk differs");
    let store = open(dir.path(), 1 << 30);
    let t = store.get(&d).unwrap().expect("task survives a restart");
    assert!(collect(t, 0..data.len() as u64, Delivery::Whole, src.clone()).await.unwrap() == data);
    assert_eq!(src.requests.lock().unwrap().len(), 2, "read again from the origin after the restart");
}

#[tokio::test]
async fn wrong_bytes_are_never_completed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let (data, d) = blob(6 * MIB);
    let src = MemSource::new(data.clone(), Faults { corrupt: true, ..Faults::default() });
    let t = store.get_or_create(&d, data.len() as u64, None).unwrap();
    let res = collect(t, 0..data.len() as u64, Delivery::Whole, src.clone()).await;
    assert!(res.is_err());
    assert_eq!(store.metrics().verify_failures.get(), 1);
    // The task is gone: the next request starts afresh.
    assert!(store.get(&d).unwrap().is_none());
}

#[tokio::test]
async fn restart_keeps_the_cache_and_catches_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let (data, d) = blob(9 * MIB);
    let src = MemSource::new(data.clone(), Faults::default());
    {
        let store = open(dir.path(), 1 << 30);
        let t = store.get_or_create(&d, data.len() as u64, None).unwrap();
        collect(t, 0..data.len() as u64, Delivery::Whole, src.clone()).await.unwrap();
        store.flush_all();
    }
    {
        let store = open(dir.path(), 1 << 30);
        let t = store.get(&d).unwrap().expect("task survives a restart");
        assert!(collect(t, 0..data.len() as u64, Delivery::Whole, src.clone()).await.unwrap() == data);
        assert_eq!(src.requests.lock().unwrap().len(), 1);
    }
    // Flip one byte in the second piece on disk, as a failing disk would.
    let path = data_file(dir.path(), &d);
    let bytes = std::fs::read(&path).unwrap();
    overwrite(&path, 5 * MIB, &[bytes[5 * MIB] ^ 0xff]);
    let store = open(dir.path(), 1 << 30);
    let t = store.get(&d).unwrap().unwrap();
    assert!(collect(t, 0..data.len() as u64, Delivery::Whole, src.clone()).await.unwrap() == data);
    assert_eq!(src.requests.lock().unwrap().last().unwrap(), &Some((4 * MIB) as u64..(8 * MIB) as u64));
    assert_eq!(store.metrics().piece_failures.get_or_create(&metrics::ReasonLabel { reason: "corrupt" }).get(), 1);
}

#[tokio::test]
async fn torn_write_recovery_never_serves_unwritten_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let (data, d) = blob(5 * MIB);
    let src = MemSource::new(data.clone(), Faults::default());
    {
        let store = open(dir.path(), 1 << 30);
        let t = store.get_or_create(&d, data.len() as u64, None).unwrap();
        collect(t, 0..data.len() as u64, Delivery::Whole, src.clone()).await.unwrap();
        store.flush_all();
    }
    // Simulate a crash that kept the metadata but lost the data pages (no fsync): zero the file.
    let path = data_file(dir.path(), &d);
    overwrite(&path, 0, &vec![0u8; data.len()]);
    let store = open(dir.path(), 1 << 30);
    let t = store.get(&d).unwrap().unwrap();
    assert!(collect(t, 0..data.len() as u64, Delivery::Whole, src.clone()).await.unwrap() == data);
    // Each piece was found bad and fetched again: exactly one more copy of the content.
    assert_eq!(src.sent.load(Ordering::SeqCst), 2 * data.len());
}

#[tokio::test]
async fn quota_evicts_least_recently_used_unpinned_tasks() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), (10 * MIB) as u64);
    let blobs: Vec<_> = (1..=3).map(|i| blob(4 * MIB + i)).collect();
    for (data, d) in &blobs {
        cache_whole(&store, data, d).await;
        assert!(store.used() <= (10 * MIB) as u64);
    }
    assert!(store.get(&blobs[0].1).unwrap().is_none());
    assert!(store.get(&blobs[2].1).unwrap().is_some());
    assert_eq!(store.metrics().evictions.get(), 1);
    // Everything pinned: no room, which callers turn into streaming without caching.
    let _a = store.get(&blobs[1].1).unwrap().unwrap();
    let _b = store.get(&blobs[2].1).unwrap().unwrap();
    let (big, bd) = blob(5 * MIB);
    assert!(matches!(store.get_or_create(&bd, big.len() as u64, None), Err(StoreError::NoSpace(_))));
}

/// A registry can announce any length: until bytes arrive, nothing is evicted for it, and
/// once its fetch ends without them, the blocks allocated for it go back to the disk.
#[tokio::test]
async fn a_made_up_length_evicts_nothing_and_holds_no_disk_once_its_fetch_ends() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), (10 * MIB) as u64);
    let cached: Vec<_> = (1..=2).map(|i| blob(4 * MIB + i)).collect();
    for (data, d) in &cached {
        cache_whole(&store, data, d).await;
    }
    let used = store.used();
    // The registry says 9 MiB and sends nothing.
    let (claimed, d) = blob(9 * MIB);
    let silent = MemSource::new(claimed.clone(), Faults { cut_after: Some((0, 100)), ..Faults::default() });
    let t = store.get_or_create(&d, claimed.len() as u64, None).unwrap();
    assert!(collect(t.clone(), 0..claimed.len() as u64, Delivery::Whole, silent).await.is_err());
    assert_eq!(store.metrics().evictions.get(), 0, "a length alone evicted cached content");
    assert!(cached.iter().all(|(_, d)| store.get(d).unwrap().is_some()));
    assert!(store.used() - used <= 8192, "charged {} for a task holding nothing", store.used() - used);
    drop(t);
    let file = std::fs::read_dir(dir.path().join("tasks/sha256"))
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|x| x == "data") && p.to_string_lossy().contains(d.hex()))
        .expect("the task's data file");
    let blocks = std::fs::metadata(&file).unwrap().blocks() * 512;
    assert!(blocks < MIB as u64, "{blocks} bytes of disk held by a task that received none");
}

/// One-byte tasks cost a data block, a metadata block and two inodes each, not one byte: the
/// charge says so, and their number is capped.
#[tokio::test]
async fn tiny_tasks_are_charged_their_blocks_and_capped_in_number() {
    let dir = tempfile::tempdir().unwrap();
    let store = open_capped(dir.path(), 1 << 30, 16);
    for i in 0..40u32 {
        let (data, d) = (Bytes::from(i.to_be_bytes().to_vec()), Digest::of(Algorithm::Sha256, &i.to_be_bytes()));
        store.put_verified(&d, &data, None).unwrap();
    }
    let tasks = store.metrics().cache_tasks.get();
    assert_eq!(tasks, 16);
    assert_eq!(store.used(), 16 * 8192);
    assert_eq!(store.metrics().evictions.get(), 24);
}

/// Another writer filling the disk must not make a task's writes fail half way: a new task's
/// blocks are allocated before anything is fetched (on filesystems that can).
#[test]
fn a_new_task_has_its_blocks_allocated_up_front() {
    use std::os::unix::fs::MetadataExt;
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), (64 * MIB) as u64);
    let (data, d) = blob(8 * MIB + 100);
    let _t = store.get_or_create(&d, data.len() as u64, None).unwrap();
    let file = std::fs::read_dir(dir.path().join("tasks/sha256"))
        .unwrap()
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "data"))
        .expect("the task's data file");
    let meta = file.metadata().unwrap();
    assert_eq!(meta.len(), data.len() as u64);
    assert!(meta.blocks() * 512 >= meta.len(), "{} of {} bytes allocated", meta.blocks() * 512, meta.len());
}

#[tokio::test]
async fn passthrough_withholds_the_end_of_bad_content() {
    let (data, d) = blob(MIB);
    let metrics = Arc::new(Metrics::default());
    let good = stream::iter(vec![Ok(data.slice(..1000)), Ok(data.slice(1000..))]).boxed();
    let out: Vec<_> = passthrough::verify(d.clone(), data.len() as u64, good, metrics.clone()).collect().await;
    assert!(out.iter().all(|r| r.is_ok()));
    let mut bad = data.to_vec();
    bad[10] ^= 1;
    let bad = stream::iter(vec![Ok(Bytes::from(bad))]).boxed();
    let out: Vec<_> = passthrough::verify(d, data.len() as u64, bad, metrics).collect().await;
    assert_eq!(out.len(), 1);
    assert!(out[0].is_err());
}

#[test]
fn a_second_store_on_the_same_dir_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _a = open(dir.path(), 1 << 20);
    let b = Store::open(
        StoreConfig { dir: dir.path().to_owned(), quota: 1, direct_io: true, max_tasks: DEFAULT_MAX_TASKS },
        Arc::new(Metrics::default()),
    );
    assert!(matches!(b, Err(StoreError::Locked(_))));
}

// Write-behind and pacing (`stage.rs`, `pace.rs`): readers get the staged chunks while they keep
// up, the bytes from disk once they fall behind, and never hold a fetch back for long.

/// Reads a frame, then nothing for `pause`, then the rest.
async fn read_with_pause(task: TaskRef, len: u64, src: Arc<MemSource>, pause: std::time::Duration) -> Vec<u8> {
    let mut s = Box::pin(read(task, 0..len, Delivery::Whole, src));
    let mut out = s.next().await.unwrap().unwrap().to_vec();
    tokio::time::sleep(pause).await;
    while let Some(b) = s.next().await {
        out.extend_from_slice(&b.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stalled_reader_neither_holds_the_fetch_back_nor_misses_bytes() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let (data, d) = blob(40 * MIB + 5);
    let src = MemSource::new(data.clone(), Faults::default());
    let t = store.get_or_create(&d, data.len() as u64, None).unwrap();
    let len = data.len() as u64;
    // This one stops for longer than a reader may hold a fetch back, so by the time it reads
    // on, its bytes have left memory and come from disk.
    let stalled = tokio::spawn(read_with_pause(t.clone(), len, src.clone(), std::time::Duration::from_millis(2500)));
    let started = std::time::Instant::now();
    let other = collect(t.clone(), 0..len, Delivery::Whole, src.clone()).await.unwrap();
    assert!(started.elapsed() < std::time::Duration::from_secs(2), "held back for {:?}", started.elapsed());
    assert!(other == data);
    assert!(stalled.await.unwrap() == data);
    assert_eq!(src.requests.lock().unwrap().len(), 1);
    assert!(t.is_verified());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_waits_for_a_slow_reader_that_keeps_up() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let (data, d) = blob(24 * MIB);
    let src = MemSource::new(data.clone(), Faults::default());
    let t = store.get_or_create(&d, data.len() as u64, None).unwrap();
    let mut s = Box::pin(read(t.clone(), 0..data.len() as u64, Delivery::Whole, src.clone()));
    let (mut got, mut most_ahead) = (Vec::new(), 0);
    while let Some(b) = s.next().await {
        got.extend_from_slice(&b.unwrap());
        tokio::time::sleep(std::time::Duration::from_millis(2)).await;
        let ahead = src.taken.load(Ordering::SeqCst).saturating_sub(got.len());
        most_ahead = most_ahead.max(ahead);
    }
    assert!(got == data);
    // Unpaced, the fetch would take the whole body long before this reader got far.
    let slack = 2 * MIB;
    assert!(most_ahead <= crate::task::AHEAD as usize + slack, "fetch got {most_ahead} bytes ahead");
    assert!(t.is_verified());
}

#[tokio::test]
async fn piece_digests_are_backfilled_only_for_content_that_still_matches_its_digest() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let (good, dg) = blob(9 * MIB + 7);
    let (rotten, dr) = blob(5 * MIB + 3);
    for (data, d) in [(&good, &dg), (&rotten, &dr)] {
        let src = MemSource::new(data.clone(), Faults::default());
        let t = store.get_or_create(d, data.len() as u64, None).unwrap();
        assert!(collect(t, 0..data.len() as u64, Delivery::Whole, src).await.unwrap() == *data);
    }
    assert!(store.verified_tasks(10).is_empty(), "a node alone keeps no piece digests");
    overwrite(&data_file(dir.path(), &dr), 100, b"rot");

    assert_eq!(store.backfill_piece_digests(&|| false), 1);
    let metas = store.verified_tasks(10);
    assert_eq!(metas.len(), 1);
    assert_eq!(metas[0].digest, dg);
    let expected: Vec<String> =
        good.chunks(4 * MIB).map(|c| Digest::of(Algorithm::Sha256, c).hex().to_owned()).collect();
    let got: Vec<String> = metas[0].pieces.iter().map(|p| p.as_ref().unwrap().sha256.clone().unwrap()).collect();
    assert_eq!(got, expected);
    assert!(store.get(&dr).unwrap().is_none(), "content that no longer matches is dropped");
}

/// Regression: the fetch paced itself against its own position, which runs ahead of the one
/// readers are told of, so a reader waiting at the head did not count as waiting and was held
/// to the pace of a slower one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_waiting_for_the_fetch_is_not_slowed_by_a_slower_one() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let (data, d) = blob(40 * MIB);
    let src = MemSource::new(data.clone(), Faults::default());
    let t = store.get_or_create(&d, data.len() as u64, None).unwrap();
    let len = data.len() as u64;
    let slow = {
        let (t, src) = (t.clone(), src.clone());
        tokio::spawn(async move {
            let mut s = Box::pin(read(t, 0..len, Delivery::Whole, src));
            let mut n = 0;
            while let Some(b) = s.next().await {
                n += b.unwrap().len();
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
            n
        })
    };
    let started = std::time::Instant::now();
    assert!(collect(t.clone(), 0..len, Delivery::Whole, src.clone()).await.unwrap() == data);
    let took = started.elapsed();
    assert!(took < std::time::Duration::from_millis(1500), "the fast reader took {took:?}");
    assert_eq!(slow.await.unwrap(), data.len());
}

#[test]
fn a_swarm_fetch_takes_no_pieces_for_a_task_abandoned_after_a_write_error() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let (data, digest) = blob(12 * MIB);
    let task = store.get_or_create(&digest, data.len() as u64, None).unwrap();
    let Ok(crate::task::Step::Fetch { pieces, id }) = task.task().step(0, data.len() as u64, true, None) else {
        panic!("a cold task starts a fetch")
    };
    assert_eq!(task.task().claimed(id, pieces.clone()), vec![0, 1, 2]);
    task.task().abandon("write failed");
    assert!(task.task().claimed(id, pieces).is_empty());
}

#[test]
fn idle_tasks_past_the_open_bound_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let fds = || std::fs::read_dir("/proc/self/fd").map(|d| d.count()).unwrap_or(0);
    let before = fds();
    let digests: Vec<Digest> = (0..400u32)
        .map(|i| {
            let data = i.to_le_bytes();
            let d = Digest::of(Algorithm::Sha256, &data);
            store.put_verified(&d, &data, None).unwrap();
            d
        })
        .collect();
    // Other tests of this binary open files too: the bound shows as far fewer than 400.
    let grown = fds().saturating_sub(before);
    assert!(grown < 300, "{grown} more descriptors open after 400 tasks");
    // A closed task opens again, content intact, and one in use stays open.
    let held = store.get(&digests[0]).unwrap().expect("task");
    assert!(held.is_verified());
    for d in &digests[1..] {
        assert!(store.get(d).unwrap().expect("task").is_verified());
    }
    assert!(held.is_verified() && held.len() == 4);
}

/// Bytes handed to readers, from any source.
fn read_bytes(store: &Store) -> u64 {
    ["origin", "cache", "peer"]
        .into_iter()
        .map(|source| store.metrics().sent_bytes.get_or_create(&metrics::SourceLabel { source }).get())
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn background_fill_walks_a_blob_once_however_many_reads_ask() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let (data, d) = blob(12 * MIB);
    let src = MemSource::new(data.clone(), Faults::default());
    let t = store.get_or_create(&d, data.len() as u64, None).unwrap();
    let fills: Vec<_> = (0..8).map(|_| tokio::spawn(reader::fill(t.clone(), src.clone()))).collect();
    for f in fills {
        f.await.unwrap();
    }
    let fetched = src.sent.load(std::sync::atomic::Ordering::SeqCst) as u64;
    assert_eq!(fetched, data.len() as u64, "one fill walked the blob, the others stood aside");
    assert_eq!(read_bytes(&store), 0, "a fill sends nothing to a client");
    // Pieces count once the writer has them on disk.
    for _ in 0..100 {
        if t.is_complete() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(t.is_complete());
    // A complete task needs no fill at all.
    reader::fill(t.clone(), src.clone()).await;
    assert_eq!(src.sent.load(std::sync::atomic::Ordering::SeqCst) as u64, data.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_task_file_cut_short_under_its_map_fails_its_check_instead_of_killing_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path(), 1 << 30);
    let (data, d) = blob(9 * MIB);
    let src = MemSource::new(data.clone(), Faults::default());
    let t = store.get_or_create(&d, data.len() as u64, None).unwrap();
    assert!(collect(t.clone(), 0..data.len() as u64, Delivery::Whole, src.clone()).await.unwrap() == data);
    // What a disk read error does to a mapped page: reading it through the map is a SIGBUS.
    std::fs::OpenOptions::new().write(true).open(data_file(dir.path(), &d)).unwrap().set_len(0).unwrap();
    let task = t.task().clone();
    let count = t.layout().count();
    tokio::task::spawn_blocking(move || (0..count).for_each(|i| task.check_piece(i))).await.unwrap();
    assert!(!t.is_verified() && t.present_pieces().is_empty());
    // The pieces are fetched again, and the content is whole once more.
    assert!(collect(t.clone(), 0..data.len() as u64, Delivery::Whole, src).await.unwrap() == data);
}

#[test]
fn an_unverified_task_whose_supplier_was_named_by_an_earlier_version_is_fetched_again() {
    let dir = tempfile::tempdir().unwrap();
    let digests: Vec<Digest> = (0..3u8).map(|i| Digest::of(Algorithm::Sha256, &[i])).collect();
    {
        let store = open(dir.path(), 1 << 30);
        for d in &digests {
            store.get_or_create(d, 10, None).unwrap();
        }
    }
    // Rewrite the metadata as version 1 wrote it.
    let rewrite = |d: &Digest, verified: bool, supplier: Option<&str>| {
        let path = dir.path().join("tasks/sha256").join(format!("{}.meta", d.hex()));
        let mut meta = crate::meta::TaskMeta::load(&path).unwrap();
        (meta.version, meta.verified, meta.supplier) = (1, verified, supplier.map(str::to_owned));
        meta.store(&path).unwrap();
    };
    rewrite(&digests[0], false, Some("registry.example"));
    rewrite(&digests[1], true, Some("registry.example"));
    rewrite(&digests[2], false, None);
    let store = open(dir.path(), 1 << 30);
    assert!(store.get(&digests[0]).unwrap().is_none(), "its bytes cannot be attributed");
    assert!(store.get(&digests[1]).unwrap().is_some(), "verified content needs no supplier");
    assert!(store.get(&digests[2]).unwrap().is_some(), "nobody claimed it yet");
}
