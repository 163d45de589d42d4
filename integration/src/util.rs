//! Small shared helpers: random content, digests, ports, polling, piece arithmetic.

use std::collections::BTreeSet;
use std::future::Future;
use std::io::Read;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};

/// `n` random bytes. Test content is random per test so that no cache (the daemon's, a
/// client's content store) can hide a miss.
pub fn random_bytes(n: usize) -> Vec<u8> {
    let mut buf = vec![0u8; n];
    std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut buf)).expect("read /dev/urandom");
    buf
}

/// 32 random hex characters.
pub fn random_token() -> String {
    hex(&random_bytes(16))
}

pub fn hex(bytes: &[u8]) -> String {
    use std::fmt::Write;
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

/// `sha256:<hex>` of `data`.
pub fn sha256_digest(data: &[u8]) -> String {
    format!("sha256:{}", hex(&Sha256::digest(data)))
}

/// A loopback port that was free a moment ago (bind :0, read, release). Callers that hand it to
/// another process must retry on collision.
pub fn free_loopback_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("bind 127.0.0.1:0")
}

pub fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// `scripts/` at the repository root.
pub fn scripts_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..").join("scripts")
}

/// A reqwest client for test traffic: never uses a proxy from the environment, never
/// decompresses, generous timeouts (bodies of 100 MiB on a busy 2-core box).
pub fn http_client() -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(120))
        .pool_max_idle_per_host(0)
        .build()
        .expect("reqwest client")
}

/// Calls `probe` every 50 ms until it returns `Ok(Some(_))` or `timeout` passes. Errors from the
/// probe are remembered and reported on timeout (they usually mean "not yet").
pub async fn poll_until<T, F, Fut>(what: &str, timeout: Duration, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>>>,
{
    let deadline = Instant::now() + timeout;
    let mut last_err = None;
    loop {
        match probe().await {
            Ok(Some(v)) => return Ok(v),
            Ok(None) => {}
            Err(e) => last_err = Some(e),
        }
        if Instant::now() >= deadline {
            match last_err {
                Some(e) => return Err(e).context(format!("timed out after {timeout:?} waiting for {what}")),
                None => bail!("timed out after {timeout:?} waiting for {what}"),
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Bytes allocated on disk by the regular files under `dir` (st_blocks, so sparse files count
/// only what they use).
pub fn disk_usage(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    walk_files(dir).iter().filter_map(|p| std::fs::symlink_metadata(p).ok()).map(|m| m.blocks() * 512).sum()
}

/// Every regular file under `dir`, recursively (symlinks are not followed).
pub fn walk_files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            match entry.file_type() {
                Ok(t) if t.is_dir() => stack.push(entry.path()),
                Ok(t) if t.is_file() => out.push(entry.path()),
                _ => {}
            }
        }
    }
    out.sort();
    out
}

pub const MIB: u64 = 1 << 20;

/// The daemon's piece size for a blob of `len` bytes (the store's own rule, tested in p2p).
pub fn piece_size(len: u64) -> u64 {
    damselfly_p2p::piece::piece_size_for(len)
}

/// Indices of the pieces touched by the inclusive byte ranges `ranges`.
pub fn covered_pieces(ranges: &[(u64, u64)], piece: u64) -> BTreeSet<u64> {
    ranges.iter().flat_map(|&(first, last)| (first / piece)..=(last / piece)).collect()
}

/// Total bytes of the given pieces of a blob of `len` bytes (the last piece may be short).
pub fn pieces_total_bytes(pieces: &BTreeSet<u64>, len: u64, piece: u64) -> u64 {
    pieces.iter().map(|&i| (len - i * piece).min(piece)).sum()
}

/// Sends the daemons' logs to the test output when `RUST_LOG` is set (quiet otherwise).
pub fn init_logs() {
    if std::env::var_os("RUST_LOG").is_some() {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_test_writer()
            .try_init();
    }
}

/// Asks `child` to stop (SIGTERM), waits up to `grace` for it, then kills it.
pub fn stop_gently(child: &mut std::process::Child, grace: Duration) {
    // SAFETY: kill with a child's pid has no memory-safety preconditions.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
    let deadline = std::time::Instant::now() + grace;
    while std::time::Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn covered_pieces_counts_partial_tail() {
        let len = 24 * MIB + 2000;
        let piece = 4 * MIB;
        let set = covered_pieces(&[(len - 4100, len - 1), (0, MIB - 1), (4 * MIB, 5 * MIB - 1)], piece);
        assert_eq!(set.iter().copied().collect::<Vec<_>>(), vec![0, 1, 5, 6]);
        assert_eq!(pieces_total_bytes(&set, len, piece), 12 * MIB + 2000);
    }

    #[test]
    fn digest_of_empty() {
        assert_eq!(sha256_digest(b""), "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855");
    }
}
