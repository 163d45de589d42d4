//! Docker Hub, as far as a test's dockerd can tell: a CONNECT proxy that takes every tunnel
//! (whatever host it names) to a local registry serving TLS with a certificate for
//! `registry-1.docker.io`, which dockerd trusts through `SSL_CERT_FILE`. dockerd falls back to
//! Docker Hub alone when its mirrors fail, and the tests cannot reach the real one.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::{Registry, TestCa};

/// Docker Hub's API host, which dockerd falls back to.
pub const HUB_HOST: &str = "registry-1.docker.io";

pub struct FakeHub {
    /// The registry behind the name.
    pub registry: Registry,
    /// `http://127.0.0.1:PORT`: dockerd's `HTTPS_PROXY`.
    pub proxy_url: String,
    /// The CA bundle dockerd must trust (`SSL_CERT_FILE`).
    pub ca_file: PathBuf,
    tunnels: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
    _ca: TestCa,
}

impl FakeHub {
    pub async fn start(dir: &std::path::Path) -> Result<FakeHub> {
        let ca = TestCa::new(dir, "hub-ca");
        let (cert, key) = ca.issue("hub", &[HUB_HOST]);
        let registry = Registry::start_tls(&cert, &key).await?;
        let target = registry.addr();
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let proxy_url = format!("http://{}", listener.local_addr()?);
        let tunnels = Arc::new(AtomicUsize::new(0));
        let count = tunnels.clone();
        let task = tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(tunnel(client, target));
            }
        });
        Ok(FakeHub { registry, proxy_url, ca_file: ca.cert_path(), tunnels, task, _ca: ca })
    }

    /// How many tunnels clients opened to "Docker Hub".
    pub fn tunnels(&self) -> usize {
        self.tunnels.load(Ordering::SeqCst)
    }
}

impl Drop for FakeHub {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Reads the CONNECT head, answers 200, and joins the client to `target`.
async fn tunnel(mut client: TcpStream, target: SocketAddr) {
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        match client.read(&mut byte).await {
            Ok(1) => head.push(byte[0]),
            _ => return,
        }
    }
    if !head.starts_with(b"CONNECT ") {
        let _ = client.write_all(b"HTTP/1.1 405 Method Not Allowed\r\ncontent-length: 0\r\n\r\n").await;
        return;
    }
    let Ok(mut upstream) = TcpStream::connect(target).await else { return };
    if client.write_all(b"HTTP/1.1 200 Connection established\r\n\r\n").await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut client, &mut upstream).await;
}
