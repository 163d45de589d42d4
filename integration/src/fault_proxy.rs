//! A TCP proxy between the daemon and its upstream that injects faults into responses.
//!
//! It parses just enough HTTP/1.1: the request head (to match rules on the request target and
//! to force `Connection: close`, so each connection carries exactly one exchange) and the
//! response head (everything after it, up to the upstream's close, is the body). Faults:
//! - [`FaultProxy::cut_after`]: forward only the first N body bytes, then close both sides;
//! - [`FaultProxy::corrupt`]: flip every body byte, so the upstream serves wrong content;
//! - [`FaultProxy::delay`]: hold the response head back, as a remote registry's token
//!   exchange and redirect to a CDN do.
//!
//! Rules apply to GET requests only (a HEAD must not use up a "once" rule). Anything that does
//! not start like an HTTP request (a TLS ClientHello, say) is piped through untouched.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use anyhow::Result;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// How often a rule fires.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Times {
    Once,
    Always,
}

#[derive(Debug, Clone, Copy)]
enum Fault {
    CutAfter(u64),
    Corrupt,
    Delay(std::time::Duration),
}

#[derive(Debug)]
struct Rule {
    target_contains: String,
    fault: Fault,
    times: Times,
    fired: u32,
}

/// One request that went through the proxy.
#[derive(Debug, Clone)]
pub struct ProxiedRequest {
    pub method: String,
    pub target: String,
    /// Response status from upstream (0 if none arrived).
    pub status: u16,
    /// The fault applied, if any (`"cut"`/`"corrupt"`).
    pub fault: Option<&'static str>,
}

#[derive(Default)]
struct State {
    rules: Vec<Rule>,
    requests: Vec<ProxiedRequest>,
}

pub struct FaultProxy {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    // Dropping the set aborts the accept loop, which owns (and so aborts) every connection task.
    _tasks: JoinSet<()>,
}

const MAX_HEAD: usize = 64 * 1024;

impl FaultProxy {
    /// Listens on a free loopback port and forwards to `upstream`.
    pub async fn start(upstream: SocketAddr) -> Result<FaultProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(Mutex::new(State::default()));
        let mut tasks = JoinSet::new();
        let st = state.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((client, _)) = accepted else { continue };
                        conns.spawn(handle(client, upstream, st.clone()));
                    }
                    // Reap finished connection tasks so the set does not grow without bound.
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(FaultProxy { addr, state, _tasks: tasks })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// For GETs whose target contains `target_contains`, forward only `body_bytes` bytes of
    /// the response body and then close the connection.
    pub fn cut_after(&self, target_contains: &str, body_bytes: u64, times: Times) {
        self.add(target_contains, Fault::CutAfter(body_bytes), times);
    }

    /// For GETs whose target contains `target_contains`, flip every body byte.
    pub fn delay(&self, target_contains: &str, by: std::time::Duration, times: Times) {
        self.add(target_contains, Fault::Delay(by), times);
    }

    pub fn corrupt(&self, target_contains: &str, times: Times) {
        self.add(target_contains, Fault::Corrupt, times);
    }

    fn add(&self, target_contains: &str, fault: Fault, times: Times) {
        self.state.lock().unwrap().rules.push(Rule {
            target_contains: target_contains.to_owned(),
            fault,
            times,
            fired: 0,
        });
    }

    /// Removes every rule: pure pass-through from now on.
    pub fn clear(&self) {
        self.state.lock().unwrap().rules.clear();
    }

    /// How many times faults fired on requests whose target contains `target_contains`.
    pub fn fired(&self, target_contains: &str) -> usize {
        self.requests().iter().filter(|r| r.fault.is_some() && r.target.contains(target_contains)).count()
    }

    pub fn requests(&self) -> Vec<ProxiedRequest> {
        self.state.lock().unwrap().requests.clone()
    }
}

async fn handle(mut client: TcpStream, upstream: SocketAddr, state: Arc<Mutex<State>>) {
    let _ = proxy_one(&mut client, upstream, &state).await;
}

async fn proxy_one(client: &mut TcpStream, upstream: SocketAddr, state: &Mutex<State>) -> std::io::Result<()> {
    let mut buf = Vec::with_capacity(8192);
    let mut chunk = vec![0u8; 64 * 1024];
    // Read the request head.
    let head_end = loop {
        let n = client.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
        if !buf[0].is_ascii_uppercase() || buf.len() > MAX_HEAD {
            // Not HTTP (e.g. a TLS ClientHello) or absurd: let the upstream deal with it.
            let mut up = TcpStream::connect(upstream).await?;
            up.write_all(&buf).await?;
            tokio::io::copy_bidirectional(client, &mut up).await?;
            return Ok(());
        }
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p + 4;
        }
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
    let mut lines = head.split("\r\n");
    let request_line = lines.next().unwrap_or_default().to_owned();
    let mut parts = request_line.split(' ');
    let method = parts.next().unwrap_or_default().to_owned();
    let target = parts.next().unwrap_or_default().to_owned();

    // One exchange per connection: the body then simply ends at the upstream's close.
    let mut new_head = format!("{request_line}\r\n");
    for line in lines.filter(|l| !l.is_empty()) {
        let name = line.split(':').next().unwrap_or_default().trim().to_ascii_lowercase();
        if name != "connection" && name != "keep-alive" && name != "proxy-connection" {
            new_head.push_str(line);
            new_head.push_str("\r\n");
        }
    }
    new_head.push_str("Connection: close\r\n\r\n");

    let fault = {
        let mut st = state.lock().unwrap();
        let rule = st.rules.iter_mut().find(|r| {
            method == "GET" && target.contains(&r.target_contains) && (r.times == Times::Always || r.fired == 0)
        });
        rule.map(|r| {
            r.fired += 1;
            r.fault
        })
    };
    let index = {
        let mut st = state.lock().unwrap();
        st.requests.push(ProxiedRequest {
            method: method.clone(),
            target: target.clone(),
            status: 0,
            fault: fault.map(|f| match f {
                Fault::CutAfter(_) => "cut",
                Fault::Corrupt => "corrupt",
                Fault::Delay(_) => "delay",
            }),
        });
        st.requests.len() - 1
    };

    let up = TcpStream::connect(upstream).await?;
    let (mut up_read, mut up_write) = up.into_split();
    let (mut client_read, mut client_write) = client.split();
    up_write.write_all(new_head.as_bytes()).await?;
    up_write.write_all(&buf[head_end..]).await?;

    // Any request body keeps flowing upstream while the response comes back.
    let upload = async {
        let _ = tokio::io::copy(&mut client_read, &mut up_write).await;
    };
    let download = async {
        // Response head.
        let mut resp = Vec::with_capacity(8192);
        let body_start = loop {
            let n = up_read.read(&mut chunk).await?;
            if n == 0 {
                client_write.write_all(&resp).await?;
                return Ok::<_, std::io::Error>(());
            }
            resp.extend_from_slice(&chunk[..n]);
            if let Some(p) = resp.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
        };
        let status = std::str::from_utf8(&resp[..body_start])
            .ok()
            .and_then(|h| h.split(' ').nth(1))
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        state.lock().unwrap().requests[index].status = status;
        if let Some(Fault::Delay(by)) = fault {
            tokio::time::sleep(by).await;
        }
        client_write.write_all(&resp[..body_start]).await?;

        let mut sent = 0u64;
        let mut pending = resp[body_start..].to_vec();
        loop {
            if !pending.is_empty() {
                match fault {
                    Some(Fault::CutAfter(limit)) => {
                        let allowed = limit.saturating_sub(sent).min(pending.len() as u64) as usize;
                        client_write.write_all(&pending[..allowed]).await?;
                        sent += allowed as u64;
                        if sent >= limit {
                            // Cut: stop relaying; returning drops both connections.
                            return Ok(());
                        }
                    }
                    Some(Fault::Corrupt) => {
                        pending.iter_mut().for_each(|b| *b ^= 0xff);
                        client_write.write_all(&pending).await?;
                        sent += pending.len() as u64;
                    }
                    Some(Fault::Delay(_)) | None => {
                        client_write.write_all(&pending).await?;
                        sent += pending.len() as u64;
                    }
                }
            }
            let n = up_read.read(&mut chunk).await?;
            if n == 0 {
                client_write.shutdown().await?;
                return Ok(());
            }
            pending.clear();
            pending.extend_from_slice(&chunk[..n]);
        }
    };
    // The exchange is over when the response is; a still-open upload side is abandoned.
    tokio::select! {
        r = download => r,
        _ = async { upload.await; std::future::pending::<()>().await } => Ok(()),
    }
}
