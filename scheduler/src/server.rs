//! Composition: the scheduler served over gRPC (with the standard health service) and HTTP on
//! listeners the caller bound, until shut down.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};
use tonic_health::ServingStatus;

use crate::config::{SchedulerConfig, ServerTls};
use crate::error::SchedulerError;
use crate::identity::SeedName;
use crate::proto::scheduler_server::SchedulerServer;
use crate::scheduler::Scheduler;
use crate::service::SchedulerService;

/// Servers still running this long after shutdown was asked for are stopped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(5);
/// How often waits on seeds and host expiry are looked at.
const TICK: Duration = Duration::from_secs(1);
/// Streams one gRPC connection may open at once.
const MAX_STREAMS: u32 = 256;

pub struct Running {
    pub grpc_addr: SocketAddr,
    pub http_addr: Option<SocketAddr>,
    scheduler: Scheduler,
    shutdown: CancellationToken,
    tasks: Vec<JoinHandle<()>>,
}

/// Serves the Scheduler service and the gRPC health service (SERVING for the Scheduler and for
/// "") on `grpc`, and `/healthy` and `/metrics` on `http` if given.
pub async fn start(
    config: SchedulerConfig,
    grpc: TcpListener,
    http: Option<TcpListener>,
) -> Result<Running, SchedulerError> {
    let seed_name = seed_name(&config)?;
    if config.insecure {
        tracing::warn!(
            "insecure cluster: calls are taken without a membership proof, from anyone who reaches the gRPC port"
        );
    }
    let grpc_addr = grpc.local_addr()?;
    let http_addr = http.as_ref().map(TcpListener::local_addr).transpose()?;
    let scheduler = Scheduler::new(config.clone());
    let (reporter, health) = tonic_health::server::health_reporter();
    reporter.set_serving::<SchedulerServer<SchedulerService>>().await;
    reporter.set_service_status("", ServingStatus::Serving).await;
    let shutdown = CancellationToken::new();
    let incoming = crate::conn::limited(grpc);
    // Keep-alive pings find peers that went away; a node's one session carries all its
    // downloads, so a few streams per connection is what nodes use.
    let mut builder = tonic::transport::Server::builder()
        .http2_keepalive_interval(Some(Duration::from_secs(30)))
        .http2_keepalive_timeout(Some(Duration::from_secs(10)))
        .max_concurrent_streams(Some(MAX_STREAMS))
        .tcp_keepalive(Some(Duration::from_secs(60)));
    if let Some(tls) = &config.tls {
        builder = builder.tls_config(server_tls(tls)).map_err(|e| SchedulerError::Tls(e.to_string()))?;
    }
    let router = builder.add_service(health).add_service(SchedulerService::server(scheduler.clone(), seed_name));
    let stop = shutdown.clone();
    let mut tasks = vec![tokio::spawn(async move {
        if let Err(e) = router.serve_with_incoming_shutdown(incoming, stop.cancelled_owned()).await {
            tracing::error!(error = %e, "grpc server failed");
        }
    })];
    if let Some(listener) = http {
        tasks.push(tokio::spawn(crate::http::serve(listener, scheduler.clone(), shutdown.clone())));
    }
    tasks.push(tokio::spawn(upkeep(scheduler.clone(), shutdown.clone())));
    tracing::info!(grpc = %grpc_addr, http = ?http_addr, "damselfly scheduler started");
    Ok(Running { grpc_addr, http_addr, scheduler, shutdown, tasks })
}

fn server_tls(tls: &ServerTls) -> ServerTlsConfig {
    let config = ServerTlsConfig::new().identity(Identity::from_pem(&tls.cert, &tls.key));
    match &tls.client_ca {
        Some(ca) => config.client_ca_root(Certificate::from_pem(ca)),
        None => config,
    }
}

/// The name seeds' certificates must carry; it means something only when client certificates
/// are verified.
fn seed_name(config: &SchedulerConfig) -> Result<Option<SeedName>, SchedulerError> {
    let Some(tls) = config.tls.as_ref() else { return Ok(None) };
    let Some(name) = tls.seed_name.as_deref() else { return Ok(None) };
    if tls.client_ca.is_none() {
        return Err(SchedulerError::Tls("a seed name needs client certificates (a client CA)".to_owned()));
    }
    SeedName::parse(name).map(Some)
}

async fn upkeep(scheduler: Scheduler, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => scheduler.tick(Instant::now()),
        }
    }
}

impl Running {
    /// The core, for in-process inspection.
    pub fn scheduler(&self) -> &Scheduler {
        &self.scheduler
    }

    /// Stops accepting, ends open streams (which would otherwise hold the graceful shutdown
    /// open for as long as their downloads last), and waits briefly for the servers to stop.
    pub async fn shutdown(self) {
        self.shutdown.cancel();
        self.scheduler.close_streams();
        for mut task in self.tasks {
            if tokio::time::timeout(DRAIN_TIMEOUT, &mut task).await.is_err() {
                task.abort();
            }
        }
    }
}
