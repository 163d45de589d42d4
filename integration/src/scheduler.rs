//! The scheduler under test, in-process on a loopback port; restartable on the same port so
//! that nodes configured with its address find it again.

use std::net::SocketAddr;

use anyhow::{anyhow, Result};
use damselfly_scheduler::{Running, SchedulerConfig};

pub struct Scheduler {
    running: Option<Running>,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    config: SchedulerConfig,
}

impl Scheduler {
    /// On `ip:0` with a short announce interval, so restarts are noticed quickly in tests.
    pub async fn start(ip: [u8; 4], secret: &[u8]) -> Result<Scheduler> {
        let config = SchedulerConfig {
            secret: secret.to_vec(),
            announce_interval: std::time::Duration::from_secs(2),
            ..SchedulerConfig::default()
        };
        Self::start_on(config, SocketAddr::from((ip, 0)), SocketAddr::from((ip, 0))).await
    }

    async fn start_on(config: SchedulerConfig, grpc: SocketAddr, http: SocketAddr) -> Result<Scheduler> {
        let grpc = tokio::net::TcpListener::bind(grpc).await?;
        let http = tokio::net::TcpListener::bind(http).await?;
        let running = damselfly_scheduler::start(config.clone(), grpc, Some(http))
            .await
            .map_err(|e| anyhow!("scheduler: {e}"))?;
        let http_addr = running.http_addr.ok_or_else(|| anyhow!("scheduler has no HTTP address"))?;
        Ok(Scheduler { grpc_addr: running.grpc_addr, http_addr, running: Some(running), config })
    }

    /// `http://ip:port` of the gRPC service, as nodes are configured with it.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.http_addr)
    }

    /// Stops the scheduler; its state is gone.
    pub async fn stop(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Starts a fresh scheduler (empty state, same secret) on the same addresses.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        let fresh = Self::start_on(self.config.clone(), self.grpc_addr, self.http_addr).await?;
        *self = fresh;
        Ok(())
    }
}
