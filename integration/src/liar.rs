//! A registry that says yes to everything: every `HEAD` is a `200` with the length and type it
//! was told to claim, every `GET` gets that many bytes of its own (`E`s), as a `206` when a
//! range is asked for. What an attacker runs and names in a request (`?ns=`,
//! `X-Dragonfly-Registry`) to read what others cached, or to make a daemon act on its word.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{header, Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

/// What the liar claims about every digest it is asked for.
#[derive(Clone, Debug)]
pub struct Claim {
    pub len: u64,
    pub content_type: String,
}

pub struct Liar {
    addr: SocketAddr,
    requests: Arc<Mutex<Vec<(Method, String)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Liar {
    pub async fn start(claim: Claim) -> anyhow::Result<Liar> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let requests = Arc::new(Mutex::new(Vec::new()));
        let seen = requests.clone();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                let (claim, seen) = (claim.clone(), seen.clone());
                tokio::spawn(async move {
                    let svc = service_fn(move |req: Request<Incoming>| {
                        seen.lock().unwrap().push((req.method().clone(), req.uri().to_string()));
                        std::future::ready(Ok::<_, Infallible>(answer(&claim, &req)))
                    });
                    let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        Ok(Liar { addr, requests, task })
    }

    /// `127.0.0.1:PORT`, as `?ns=` names it (the daemon must list it as an insecure registry,
    /// which makes it a registry the operator named).
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`, as `X-Dragonfly-Registry` names it: any client can.
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub fn requests(&self) -> Vec<(Method, String)> {
        self.requests.lock().unwrap().clone()
    }
}

impl Drop for Liar {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn answer(claim: &Claim, req: &Request<Incoming>) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::new()));
    let h = resp.headers_mut();
    h.insert(header::CONTENT_TYPE, claim.content_type.parse().expect("content type"));
    if req.uri().path() == "/v2/" {
        return resp;
    }
    let range = req.headers().get(header::RANGE).and_then(|v| v.to_str().ok()).and_then(|v| {
        let (a, b) = v.strip_prefix("bytes=")?.split_once('-')?;
        let a: u64 = a.parse().ok()?;
        let b = b.parse::<u64>().map_or(claim.len.saturating_sub(1), |b| b.min(claim.len.saturating_sub(1)));
        Some((a, b))
    });
    let (start, n) = match range {
        Some((a, b)) if a <= b => {
            *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
            let value = format!("bytes {a}-{b}/{}", claim.len);
            resp.headers_mut().insert(header::CONTENT_RANGE, value.parse().expect("content range"));
            (a, b - a + 1)
        }
        _ => (0, claim.len),
    };
    resp.headers_mut().insert(header::CONTENT_LENGTH, n.into());
    if req.method() == Method::GET {
        *resp.body_mut() = Full::new(Bytes::from((start..start + n).map(noise).collect::<Vec<u8>>()));
    }
    resp
}

/// The liar's byte at `offset`: the same for every request, all 256 values.
pub fn noise(offset: u64) -> u8 {
    (offset.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 56) as u8
}
