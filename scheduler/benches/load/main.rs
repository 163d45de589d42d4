//! Scheduler load benchmark: 10,000 simulated peers over 100 tasks register, report pieces,
//! ask again and finish. The goal is ≥ 20,000 decisions/s with a p99 of ≤ 2 ms, the scheduler
//! pinned to one core (the load generator to the other when there is one).
//!
//! Reported: decisions per second offered and achieved, decisions per CPU-second of the
//! scheduler's thread (which other load on the machine does not skew), p99 decision time inside
//! the scheduler and p99 round trip at the simulated peers, the same in process without gRPC,
//! and memory per peer. Each run over gRPC follows one against a stub that answers the same
//! requests without deciding anything (`stub.rs`): the floor that tonic, h2 and the kernel set
//! on this machine.
//!
//! `cargo bench -p damselfly-scheduler --bench load`; `LOAD_PEERS` changes the number of peers,
//! `LOAD_RUNS` the number of runs over gRPC (3; 0 measures in process only).

use std::time::{Duration, Instant};

use damselfly_proto::v1::download_request::Kind as Req;
use damselfly_proto::v1::download_response::Kind;
use damselfly_proto::v1::scheduler_client::SchedulerClient;
use damselfly_proto::v1::session_response::Kind as SessionKind;
use damselfly_proto::v1::{self as proto, DownloadRequest, DownloadResponse, SessionRequest, SessionResponse};
use damselfly_scheduler::{start, DecisionKind, Scheduler, SchedulerConfig};
use futures_util::StreamExt;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;
use tonic::Streaming;

mod stub;

const TASKS: usize = 100;
const PIECES: u32 = 8;
const PIECE_SIZE: u64 = 4 << 20;
/// Peers starting a download per second; each makes two decisions, so 22,000 decisions/s are
/// offered and the 20,000/s target is met only if the scheduler keeps up. `LOAD_RATE` changes it
/// (to see the latency at lower load).
fn rate() -> f64 {
    std::env::var("LOAD_RATE").ok().and_then(|v| v.parse().ok()).filter(|r: &f64| *r > 0.0).unwrap_or(11_000.0)
}
/// Announcements in flight at once while the hosts join.
const CONCURRENCY: usize = 32;
const CONNECTIONS: usize = 8;

fn peers() -> usize {
    std::env::var("LOAD_PEERS").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000)
}

fn digest(t: usize) -> String {
    format!("sha256:{t:064x}")
}

fn host(i: usize) -> proto::Host {
    proto::Host {
        id: format!("host-{i}"),
        ip: "10.1.0.1".into(),
        upload_port: 4000,
        upload_slots: 8,
        ..Default::default()
    }
}

fn register(i: usize) -> proto::Register {
    proto::Register {
        host_id: format!("host-{i}"),
        digest: digest(i % TASKS),
        length: u64::from(PIECES) * PIECE_SIZE,
        piece_size: PIECE_SIZE,
        ..Default::default()
    }
}

fn report(decision: &Kind, n: u32) -> Req {
    let (parent_id, sha256) = match decision {
        Kind::Parents(p) => (p.parents.first().map(|p| p.host_id.clone()).unwrap_or_default(), String::new()),
        _ => (String::new(), format!("{n:064x}")),
    };
    Req::PieceFinished(proto::PieceFinished { number: n, parent_id, sha256, cost_micros: 1000 })
}

/// CPU time of the calling thread, from /proc (Linux; zero elsewhere).
fn thread_cpu() -> Duration {
    cpu_of(std::path::Path::new("/proc/thread-self/stat"))
}

fn cpu_of(stat: &std::path::Path) -> Duration {
    let stat = std::fs::read_to_string(stat).unwrap_or_default();
    let fields: Vec<&str> = stat.rsplit(')').next().unwrap_or("").split_whitespace().collect();
    // utime and stime, fields 14 and 15, in clock ticks of 10 ms.
    let ticks: u64 = fields.get(11..13).map_or(0, |f| f.iter().filter_map(|v| v.parse::<u64>().ok()).sum());
    Duration::from_millis(ticks * 10)
}

fn p99(mut v: Vec<Duration>) -> Duration {
    v.sort();
    v.get(v.len() * 99 / 100).copied().unwrap_or_default()
}

/// The next decision on a stream, skipping digests and piece news.
async fn decision(s: &mut Streaming<DownloadResponse>) -> Option<Kind> {
    while let Some(m) = s.message().await.ok()? {
        if let k @ (Kind::Parents(_) | Kind::BackToSource(_) | Kind::Wait(_) | Kind::Quarantined(_)) = m.kind? {
            return Some(k);
        }
    }
    None
}

/// One peer: register, report its pieces, ask again, finish. Returns its decision latencies.
async fn peer(mut c: SchedulerClient<Channel>, i: usize) -> Vec<Duration> {
    let (tx, rx) = mpsc::channel(PIECES as usize + 4);
    let send = |k: Req| tx.try_send(DownloadRequest { kind: Some(k) }).map_err(|_| ());
    let t = Instant::now();
    let _ = send(Req::Register(register(i)));
    let Ok(resp) = c.download(ReceiverStream::new(rx)).await else { return vec![] };
    let mut s = resp.into_inner();
    let Some(first) = decision(&mut s).await else { return vec![] };
    let mut took = vec![t.elapsed()];
    for n in 0..PIECES {
        let _ = send(report(&first, n));
    }
    let t = Instant::now();
    let _ = send(Req::Reschedule(proto::Reschedule { stalled: vec![] }));
    if decision(&mut s).await.is_some() {
        took.push(t.elapsed());
    }
    let _ = send(Req::Finished(proto::Finished {}));
    // As a node does: end the requests and read the stream to its end. Dropping it instead
    // resets it, and the scheduler may never read the `Finished` queued before the reset.
    drop(tx);
    while let Ok(Some(_)) = s.message().await {}
    took
}

/// A host's session stream, opened when it joined, as a node keeps one per scheduler.
struct Session {
    tx: mpsc::Sender<SessionRequest>,
    rx: Streaming<SessionResponse>,
}

async fn open_session(mut c: SchedulerClient<Channel>) -> Session {
    let (tx, rx) = mpsc::channel(PIECES as usize + 4);
    let rx = c.downloads(ReceiverStream::new(rx)).await.expect("session").into_inner();
    Session { tx, rx }
}

/// The next decision for download `id` of a session, skipping digests and piece news.
async fn session_decision(s: &mut Streaming<SessionResponse>, id: u64) -> Option<Kind> {
    while let Some(m) = s.message().await.ok()? {
        let Some(SessionKind::Response(r)) = m.kind.filter(|_| m.id == id) else { continue };
        if let k @ (Kind::Parents(_) | Kind::BackToSource(_) | Kind::Wait(_) | Kind::Quarantined(_)) = r.kind? {
            return Some(k);
        }
    }
    None
}

/// One peer on its host's session: register, report its pieces, ask again, finish, close.
async fn session_peer(mut s: Session, i: usize) -> (Vec<Duration>, Session) {
    const ID: u64 = 1;
    let send = |k: Option<Req>| {
        let request = k.map(|k| DownloadRequest { kind: Some(k) });
        s.tx.try_send(SessionRequest { id: ID, request }).map_err(drop)
    };
    let t = Instant::now();
    let _ = send(Some(Req::Register(register(i))));
    let Some(first) = session_decision(&mut s.rx, ID).await else { return (vec![], s) };
    let mut took = vec![t.elapsed()];
    for n in 0..PIECES {
        let _ = send(Some(report(&first, n)));
    }
    let t = Instant::now();
    let _ = send(Some(Req::Reschedule(proto::Reschedule { stalled: vec![] })));
    if session_decision(&mut s.rx, ID).await.is_some() {
        took.push(t.elapsed());
    }
    let _ = send(Some(Req::Finished(proto::Finished {})));
    let _ = send(None);
    (took, s)
}

/// How the simulated peers carry their downloads: `LOAD_TRANSPORT=streams` for a `Download`
/// stream each, otherwise on their host's `Downloads` session, as nodes do.
fn sessions() -> bool {
    std::env::var("LOAD_TRANSPORT").as_deref() != Ok("streams")
}

/// What answers the simulated peers.
#[derive(Clone, Copy, PartialEq)]
enum Serving {
    /// The scheduler, started as `damselfly scheduler` starts it.
    Scheduler,
    /// The same protocol answered at once, no decisions made (`stub.rs`).
    TransportOnly,
}

/// What one run over gRPC measured.
struct Run {
    serving: Serving,
    decisions: u64,
    answered: usize,
    elapsed: Duration,
    server_cpu: Duration,
    client_cpu: Duration,
    server_p99: Duration,
    p99: Duration,
}

impl Run {
    fn rate(&self) -> f64 {
        self.decisions as f64 / self.elapsed.as_secs_f64()
    }

    fn met(&self) -> bool {
        self.rate() >= 20_000.0 && self.p99 <= Duration::from_millis(2)
    }

    fn print(&self, k: usize) {
        let busy = |cpu: Duration| 100.0 * cpu.as_secs_f64() / self.elapsed.as_secs_f64();
        let who = if self.serving == Serving::Scheduler { "scheduler     " } else { "transport only" };
        let inside = match self.serving {
            Serving::Scheduler => format!("{:?}", self.server_p99),
            Serving::TransportOnly => "-".to_owned(),
        };
        println!(
            "  run {k}, {who}: {:>6.0}/s  answered {:>5}  server {:>4.0} ms CPU ({:>3.0} % busy, {:>6.0} decisions per CPU-s)  load generator {:>3.0} % busy  p99 inside {inside}  p99 round trip {:.2?}  {}",
            self.rate(),
            self.answered,
            self.server_cpu.as_secs_f64() * 1e3,
            busy(self.server_cpu),
            self.decisions as f64 / self.server_cpu.as_secs_f64().max(1e-3),
            busy(self.client_cpu),
            self.p99,
            if self.met() { "met" } else { "MISSED" },
        );
    }
}

/// Runs the gRPC phase `LOAD_RUNS` times (default 3), each against a fresh scheduler and, just
/// before, against the transport-only stub: on a shared machine one run says little, the spread
/// says more, and the stub shows how much of the cost is the scheduler's own.
fn over_grpc_runs() {
    let runs: usize = std::env::var("LOAD_RUNS").ok().and_then(|v| v.parse().ok()).unwrap_or(3);
    if runs == 0 {
        return;
    }
    println!(
        "over gRPC, {} peers, {TASKS} tasks, {PIECES} pieces each, {:.0} peers/s offered (goal ≥ 20,000/s, p99 ≤ 2 ms):",
        peers(),
        rate()
    );
    let mut all = Vec::new();
    for k in 1..=runs {
        for serving in servings() {
            let run = over_grpc(serving);
            run.print(k);
            all.push(run);
        }
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    for (serving, who) in [(Serving::TransportOnly, "transport only"), (Serving::Scheduler, "scheduler")] {
        let these: Vec<&Run> = all.iter().filter(|r| r.serving == serving).collect();
        if these.is_empty() {
            continue;
        }
        let met = these.iter().filter(|r| r.met()).count();
        println!(
            "  median, {who}: {:.0}/s, {:.0} ms CPU, p99 round trip {:.2} ms; goal met in {met} of {runs} runs",
            median(these.iter().map(|r| r.rate()).collect()),
            median(these.iter().map(|r| r.server_cpu.as_secs_f64() * 1e3).collect()),
            median(these.iter().map(|r| r.p99.as_secs_f64() * 1e3).collect()),
        );
    }
}

/// Which servers the gRPC phase runs against: both unless `LOAD_SERVING` names one
/// (`stub` or `scheduler`), e.g. to profile one alone.
fn servings() -> Vec<Serving> {
    match std::env::var("LOAD_SERVING").as_deref() {
        Ok("stub") => vec![Serving::TransportOnly],
        Ok("scheduler") => vec![Serving::Scheduler],
        _ => vec![Serving::TransportOnly, Serving::Scheduler],
    }
}

fn over_grpc(serving: Serving) -> Run {
    let n = peers();
    let offered = rate();
    // The scheduler on a single-threaded runtime of its own: one core.
    let (addr_tx, addr_rx) = std::sync::mpsc::channel();
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let server = std::thread::Builder::new().name("scheduler".into()).spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
        pin_to(0);
        rt.block_on(async move {
            let grpc = TcpListener::bind("127.0.0.1:0").await.expect("bind");
            let me = std::path::Path::new("/proc").join(std::fs::read_link("/proc/thread-self").unwrap_or_default());
            if serving == Serving::TransportOnly {
                let addr = grpc.local_addr().expect("address");
                let _ = addr_tx.send((addr, None, me));
                serve_stub(grpc, stop_rx).await;
                return;
            }
            let running = start(SchedulerConfig::default(), grpc, None).await.expect("start");
            let _ = addr_tx.send((running.grpc_addr, Some(running.scheduler().clone()), me));
            let _ = stop_rx.await;
            running.shutdown().await;
        });
    });
    let server = server.expect("server thread");
    let (addr, sched, server_proc) = addr_rx.recv().expect("server address");
    let server_stat = server_proc.join("stat");
    pin_to(1);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
    let (latencies, elapsed, server_cpu, client_cpu) = rt.block_on(async move {
        let mut clients = Vec::new();
        for _ in 0..CONNECTIONS {
            let ch = Channel::from_shared(format!("http://{addr}")).expect("uri").connect().await.expect("connect");
            clients.push(SchedulerClient::new(ch));
        }
        let announces = futures_util::stream::iter(0..n).map(|i| {
            let mut c = clients[i % CONNECTIONS].clone();
            async move {
                c.announce_host(proto::AnnounceHostRequest { host: Some(host(i)), tasks: vec![], ..Default::default() })
                    .await
            }
        });
        announces.buffer_unordered(CONCURRENCY).for_each(|r| async move { r.map(drop).expect("announce") }).await;
        // A node opens its session when it joins and keeps it: not part of a download's cost.
        let opens = futures_util::stream::iter(0..n).map(|i| open_session(clients[i % CONNECTIONS].clone()));
        let mut sessions: Vec<Option<Session>> =
            if sessions() { opens.buffered(CONCURRENCY).map(Some).collect().await } else { Vec::new() };
        // Open loop: peers arrive at a fixed rate whether or not earlier ones are done, so
        // latency includes any queueing the offered load causes.
        let (server_cpu, client_cpu) = (cpu_of(&server_stat), thread_cpu());
        let start = Instant::now();
        let mut flows = tokio::task::JoinSet::new();
        for i in 0..n {
            tokio::time::sleep_until((start + Duration::from_secs_f64(i as f64 / offered)).into()).await;
            match sessions.get_mut(i).and_then(Option::take) {
                Some(session) => flows.spawn(async move {
                    let (took, session) = session_peer(session, i).await;
                    (took, Some(session))
                }),
                None => {
                    let c = clients[i % CONNECTIONS].clone();
                    flows.spawn(async move { (peer(c, i).await, None) })
                }
            };
        }
        // Sessions stay open past the measurement, as a node's do.
        let (all, _open): (Vec<Vec<Duration>>, Vec<Option<Session>>) = flows.join_all().await.into_iter().unzip();
        // The load generator's own CPU: a saturated generator would queue round trips itself.
        let (server_cpu, client_cpu) = (cpu_of(&server_stat) - server_cpu, thread_cpu() - client_cpu);
        (all.into_iter().flatten().collect::<Vec<_>>(), start.elapsed(), server_cpu, client_cpu)
    });
    let run = Run {
        serving,
        // The stub keeps no count: every answer it sent is a decision.
        decisions: sched.as_ref().map_or(latencies.len() as u64, decisions),
        answered: latencies.len(),
        elapsed,
        server_cpu,
        client_cpu,
        server_p99: sched.as_ref().map_or(Duration::ZERO, server_p99),
        p99: p99(latencies),
    };
    // The client's connections close with its runtime; a server shutting down gracefully waits
    // for them.
    drop(rt);
    let _ = stop_tx.send(());
    server.join().expect("server thread");
    run
}

/// The stub on `listener`, served the way `damselfly_scheduler::start` serves the scheduler
/// (no delay on small writes, the same keep-alive), until `stop`.
async fn serve_stub(listener: TcpListener, stop: tokio::sync::oneshot::Receiver<()>) {
    let incoming = tokio_stream::wrappers::TcpListenerStream::new(listener).map(|conn| {
        conn.inspect(|s| {
            let _ = s.set_nodelay(true);
        })
    });
    let router = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .add_service(stub::server());
    let (drain_tx, drain_rx) = tokio::sync::oneshot::channel::<()>();
    let serve = router.serve_with_incoming_shutdown(incoming, async {
        let _ = drain_rx.await;
    });
    tokio::pin!(serve);
    tokio::select! {
        _ = &mut serve => return,
        _ = stop => {}
    }
    let _ = drain_tx.send(());
    // Connections still open after the stop are not waited for long.
    let _ = tokio::time::timeout(Duration::from_secs(5), serve).await;
}

/// Pins the calling thread to `cpu` when the machine has it (the measurement is "one core").
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes within it; the call affects only the
    // calling thread.
    unsafe {
        if libc::sysconf(libc::_SC_NPROCESSORS_ONLN) <= cpu as libc::c_long {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
    }
}

/// The allocator settings the `damselfly` binary starts with (`mirror/src/main.rs`), so that
/// the scheduler is measured as it runs there: freed memory is kept for reuse instead of going
/// back to the kernel and being faulted in again.
fn keep_freed_memory() {
    // SAFETY: mallopt only sets allocator parameters; called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 8 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
    }
}

/// Resident memory of this process, from /proc.
fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches(" kB").trim().parse::<u64>().ok());
    kib.unwrap_or(0) * 1024
}

fn decisions(s: &Scheduler) -> u64 {
    let kinds = [DecisionKind::Parents, DecisionKind::BackToSource, DecisionKind::Wait, DecisionKind::Seed];
    kinds.into_iter().map(|k| s.metrics().decisions(k)).sum()
}

/// The 99th percentile of decision time in the scheduler, as the upper bound of its bucket.
fn server_p99(s: &Scheduler) -> Duration {
    let text = s.metrics().encode().expect("metrics");
    let prefix = "damselfly_scheduler_decision_duration_seconds_bucket{le=\"";
    let buckets: Vec<(f64, f64)> = text
        .lines()
        .filter_map(|l| l.strip_prefix(prefix))
        .filter_map(|l| {
            let (le, count) = l.split_once("\"} ")?;
            Some((le.parse().unwrap_or(f64::INFINITY), count.parse().ok()?))
        })
        .collect();
    let total = buckets.last().map_or(0.0, |b| b.1);
    let le = buckets.iter().find(|b| b.1 >= total * 0.99).map_or(f64::INFINITY, |b| b.0);
    Duration::try_from_secs_f64(le).unwrap_or(Duration::MAX)
}

fn in_process() {
    let n = peers();
    pin_to(0);
    let rss_before = rss_bytes();
    let s = Scheduler::new(SchedulerConfig::default());
    for i in 0..n {
        s.announce_host(proto::AnnounceHostRequest { host: Some(host(i)), tasks: vec![], ..Default::default() })
            .expect("announce");
    }
    let cpu = thread_cpu();
    let mut open = Vec::with_capacity(n);
    for i in 0..n {
        let (mut h, mut rx) = s.download(register(i)).expect("register");
        let first = std::iter::from_fn(|| rx.try_recv().ok()).filter_map(|m| m.kind).last().expect("decision");
        for p in 0..PIECES {
            h.send(DownloadRequest { kind: Some(report(&first, p)) }).expect("report");
        }
        h.send(DownloadRequest { kind: Some(Req::Reschedule(proto::Reschedule { stalled: vec![] })) }).expect("again");
        while rx.try_recv().is_ok() {}
        open.push((h, rx));
        // Peers come and go: keep a few hundred downloads open at a time.
        if open.len() > 300 {
            let (mut h, _rx) = open.remove(0);
            h.send(DownloadRequest { kind: Some(Req::Finished(proto::Finished {})) }).expect("finish");
        }
        for (_, rx) in open.iter_mut().rev().take(8) {
            while rx.try_recv().is_ok() {}
        }
    }
    let cpu = thread_cpu() - cpu;
    drop(open);
    let per_peer = rss_bytes().saturating_sub(rss_before) as f64 / n as f64;
    let decisions = decisions(&s);
    let rate = decisions as f64 / cpu.as_secs_f64().max(1e-3);
    println!("in process, {n} peers, {TASKS} tasks, {PIECES} pieces each:");
    println!(
        "  {decisions} decisions and {} piece reports in {cpu:.2?} of CPU = {rate:.0} decisions per CPU-second",
        n * PIECES as usize
    );
    println!("  memory                   {per_peer:.0} bytes per peer (resident, hosts and tasks included)");
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is expected.
    keep_freed_memory();
    in_process();
    over_grpc_runs();
}
