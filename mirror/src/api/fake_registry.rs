//! Small in-process registries for the API's unit tests: each answers with a closure, so a
//! test can misbehave in ways a real registry cannot (other bytes for a digest, lying lengths
//! or types, no HEAD, silence).

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;

use bytes::Bytes;
use damselfly_p2p::{Metrics, Store, StoreConfig};
use http::{Request, Response};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::App;
use crate::upstream::{Upstream, UpstreamConfig};

/// What a fake registry answers; `None` accepts the connection and says nothing.
pub trait Answer: Fn(&Request<Incoming>) -> Option<Response<Full<Bytes>>> + Send + Sync + 'static {}
impl<F: Fn(&Request<Incoming>) -> Option<Response<Full<Bytes>>> + Send + Sync + 'static> Answer for F {}

pub async fn serve(answer: impl Answer) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("address");
    let answer = Arc::new(answer);
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let answer = answer.clone();
            tokio::spawn(async move {
                let svc = service_fn(move |req| {
                    let reply = answer(&req);
                    async move {
                        match reply {
                            Some(r) => Ok::<_, Infallible>(r),
                            None => std::future::pending().await,
                        }
                    }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

pub fn app(dir: &std::path::Path, quota: u64, upstream: UpstreamConfig) -> Arc<App> {
    let config =
        StoreConfig { dir: dir.to_owned(), quota, direct_io: false, max_tasks: damselfly_p2p::DEFAULT_MAX_TASKS };
    let store = Store::open(config, Arc::new(Metrics::default())).expect("store");
    Arc::new(App {
        upstream: Upstream::new(upstream).expect("upstream"),
        store,
        access: Default::default(),
        tags: Default::default(),
        metrics: Default::default(),
        background_fill: false,
        registry_in_path: true,
    })
}
