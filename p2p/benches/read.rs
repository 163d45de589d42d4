//! Throughput of the piece store's read path and the cost of its piece arithmetic.
//!
//! - `read/cached`: streaming a complete, verified 64 MiB task through `read()`, each frame
//!   copied once into a reusable buffer (what handing it to a socket costs at least), and
//!   the same with the frames only counted, which is the reader's own overhead.
//! - `read/cold`: a whole 64 MiB task fetched from an in-memory source into an empty store
//!   while it streams: writing the task file, piece crc32c, the whole-content sha256 and the
//!   held-back last byte all included. Each iteration gets a new store in a new directory.
//! - `layout`: `Layout` and `piece_size_for` calls, per call.
//!
//! `cargo bench -p damselfly-p2p` runs them (about a minute on 2 cores); `-- read/cached` picks some.

use std::hint::black_box;
use std::ops::Range;
use std::sync::Arc;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, SamplingMode, Throughput};
use damselfly_p2p::piece::{piece_size_for, Layout};
use damselfly_p2p::{
    read, Algorithm, Delivery, Digest, Metrics, Source, SourceError, SourceResponse, Store, StoreConfig,
    DEFAULT_MAX_TASKS,
};
use futures_util::future::BoxFuture;
use futures_util::{stream, StreamExt};

const MIB: usize = 1 << 20;
const TASK_LEN: usize = 64 * MIB;
/// What the mirror's upstream body chunks look like (hyper hands over up to 64 KiB at a time).
const SOURCE_CHUNK: usize = 64 << 10;

/// The whole content, served from memory in 64 KiB chunks without copying, honouring ranges.
struct MemSource(Bytes);

impl Source for MemSource {
    fn fetch(&self, range: Option<Range<u64>>) -> BoxFuture<'static, Result<SourceResponse, SourceError>> {
        let r = range.clone().unwrap_or(0..self.0.len() as u64);
        let body = self.0.slice(r.start as usize..r.end as usize);
        let chunks: Vec<Result<Bytes, SourceError>> = (0..body.len())
            .step_by(SOURCE_CHUNK)
            .map(|at| Ok(body.slice(at..(at + SOURCE_CHUNK).min(body.len()))))
            .collect();
        let honoured = range.is_some();
        Box::pin(async move { Ok(SourceResponse { range_honoured: honoured, body: stream::iter(chunks).boxed() }) })
    }
}

fn blob(len: usize) -> (Bytes, Digest) {
    let mut v = vec![0u8; len];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for chunk in v.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    let d = Digest::of(Algorithm::Sha256, &v);
    (Bytes::from(v), d)
}

fn open(dir: &std::path::Path) -> Store {
    let cfg = StoreConfig { dir: dir.to_owned(), quota: 1 << 30, direct_io: true, max_tasks: DEFAULT_MAX_TASKS };
    Store::open(cfg, Arc::new(Metrics::default())).unwrap()
}

/// Streams the whole task; with `buf`, copies every frame into it. Returns the bytes seen.
async fn stream_all(store: &Store, d: &Digest, src: &Arc<MemSource>, mut buf: Option<&mut [u8]>) -> usize {
    let task = store.get_or_create(d, TASK_LEN as u64, None).unwrap();
    let mut s = Box::pin(read(task, 0..TASK_LEN as u64, Delivery::Whole, src.clone()));
    let mut n = 0;
    while let Some(frame) = s.next().await {
        let frame = frame.unwrap();
        if let Some(buf) = buf.as_deref_mut() {
            buf[..frame.len()].copy_from_slice(&frame);
        }
        n += frame.len();
    }
    assert_eq!(n, TASK_LEN);
    n
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap()
}

fn bench_read(c: &mut Criterion) {
    let rt = runtime();
    let (data, d) = blob(TASK_LEN);
    let src = Arc::new(MemSource(data));
    let mut buf = vec![0u8; 1 << 20];

    let mut g = c.benchmark_group("read");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(3))
        .warm_up_time(std::time::Duration::from_secs(1));
    g.sampling_mode(SamplingMode::Flat).throughput(Throughput::Bytes(TASK_LEN as u64));

    let dir = tempfile::tempdir().unwrap();
    let store = open(dir.path());
    rt.block_on(stream_all(&store, &d, &src, None));
    assert!(store.get(&d).unwrap().unwrap().is_verified());
    g.bench_function("cached_64MiB_copied", |b| b.iter(|| rt.block_on(stream_all(&store, &d, &src, Some(&mut buf)))));
    g.bench_function("cached_64MiB_frames_only", |b| b.iter(|| rt.block_on(stream_all(&store, &d, &src, None))));
    drop(store);

    g.bench_function("cold_64MiB_from_memory_source", |b| {
        b.iter_batched(
            || {
                let dir = tempfile::tempdir().unwrap();
                let store = open(dir.path());
                (dir, store)
            },
            |(dir, store)| {
                rt.block_on(stream_all(&store, &d, &src, Some(&mut buf)));
                // Dropped (the task file deleted) outside the timed part.
                (dir, store)
            },
            BatchSize::PerIteration,
        )
    });
    g.finish();
}

fn bench_layout(c: &mut Criterion) {
    let lens: Vec<u64> = (0..1024u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> (20 + i % 24)).collect();
    let mut g = c.benchmark_group("layout");
    g.sample_size(10)
        .measurement_time(std::time::Duration::from_secs(3))
        .warm_up_time(std::time::Duration::from_secs(1));
    g.throughput(Throughput::Elements(lens.len() as u64));
    g.bench_function("piece_size_for", |b| {
        b.iter(|| lens.iter().map(|&l| piece_size_for(black_box(l))).fold(0u64, u64::wrapping_add))
    });
    g.bench_function("new_count_last_piece", |b| {
        b.iter(|| {
            lens.iter()
                .map(|&l| {
                    let layout = Layout::new(black_box(l));
                    let n = layout.count();
                    n as u64 + if n > 0 { layout.piece_range(n - 1).end } else { 0 }
                })
                .fold(0u64, u64::wrapping_add)
        })
    });
    let layout = Layout::new(3000 * MIB as u64);
    g.bench_function("pieces_covering", |b| {
        b.iter(|| {
            lens.iter()
                .map(|&l| {
                    let start = l % layout.len;
                    let r = black_box(&layout).pieces_covering(&(start..(start + 10 * MIB as u64).min(layout.len)));
                    (r.end - r.start) as u64
                })
                .fold(0u64, u64::wrapping_add)
        })
    });
    g.finish();
}

criterion_group!(benches, bench_read, bench_layout);
criterion_main!(benches);
