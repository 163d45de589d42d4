//! The scheduler under test, in-process on a loopback port; restartable on the same port so
//! that nodes configured with its address find it again. With a control plane
//! ([`Scheduler::start_with_control`]) its HTTP port serves the preheat API over a job store.

use std::net::SocketAddr;

use anyhow::{anyhow, Result};
use damselfly_control::store::JobStore;
use damselfly_control::ControlConfig;
use damselfly_scheduler::{Running, SchedulerConfig};

/// The job store's URL and how the control plane is set up.
type ControlSetup = (String, fn(&mut ControlConfig));

pub struct Scheduler {
    running: Option<Running>,
    control: Option<damselfly_control::Running>,
    pub grpc_addr: SocketAddr,
    pub http_addr: SocketAddr,
    config: SchedulerConfig,
    /// The job store's URL and how the control plane was set up, to restart it the same way.
    control_setup: Option<ControlSetup>,
}

impl Scheduler {
    /// On `ip:0` with a short announce interval, so restarts are noticed quickly in tests.
    pub async fn start(ip: [u8; 4], secret: &[u8]) -> Result<Scheduler> {
        Self::start_on(test_config(secret), SocketAddr::from((ip, 0)), SocketAddr::from((ip, 0)), None).await
    }

    /// The same with the control plane on the HTTP port, its jobs in the store at `job_store`
    /// (`sqlite://…` or `postgres://…`), set up by `setup`.
    pub async fn start_with_control(
        ip: [u8; 4],
        secret: &[u8],
        job_store: &str,
        setup: fn(&mut ControlConfig),
    ) -> Result<Scheduler> {
        let (grpc, http) = (SocketAddr::from((ip, 0)), SocketAddr::from((ip, 0)));
        Self::start_on(test_config(secret), grpc, http, Some((job_store.to_owned(), setup))).await
    }

    async fn start_on(
        config: SchedulerConfig,
        grpc: SocketAddr,
        http: SocketAddr,
        control_setup: Option<ControlSetup>,
    ) -> Result<Scheduler> {
        let grpc = tokio::net::TcpListener::bind(grpc).await?;
        let http = tokio::net::TcpListener::bind(http).await?;
        let http_addr = http.local_addr()?;
        let (running, control) = match &control_setup {
            None => {
                let running = damselfly_scheduler::start(config.clone(), grpc, Some(http))
                    .await
                    .map_err(|e| anyhow!("scheduler: {e}"))?;
                (running, None)
            }
            Some((url, setup)) => {
                let running = damselfly_scheduler::start(config.clone(), grpc, None)
                    .await
                    .map_err(|e| anyhow!("scheduler: {e}"))?;
                let store = JobStore::open(url).await?;
                let mut control = ControlConfig::default();
                setup(&mut control);
                let control = damselfly_control::start(control, running.scheduler().clone(), store, http).await?;
                (running, Some(control))
            }
        };
        Ok(Scheduler {
            grpc_addr: running.grpc_addr,
            http_addr,
            running: Some(running),
            control,
            config,
            control_setup,
        })
    }

    /// `http://ip:port` of the gRPC service, as nodes are configured with it.
    pub fn url(&self) -> String {
        format!("http://{}", self.grpc_addr)
    }

    /// `http://ip:port` of the HTTP port (health, metrics, the preheat API).
    pub fn http_url(&self) -> String {
        format!("http://{}", self.http_addr)
    }

    pub fn metrics_url(&self) -> String {
        format!("http://{}/metrics", self.http_addr)
    }

    /// Stops the scheduler; its state is gone.
    pub async fn stop(&mut self) {
        if let Some(c) = self.control.take() {
            c.shutdown().await;
        }
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Stops as a crash would: the control plane's job claims are left to lapse.
    pub async fn kill(&mut self) {
        if let Some(c) = self.control.take() {
            c.kill();
        }
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Starts a fresh scheduler (empty state, same secret, same job store) on the same
    /// addresses.
    pub async fn restart(&mut self) -> Result<()> {
        self.stop().await;
        let fresh =
            Self::start_on(self.config.clone(), self.grpc_addr, self.http_addr, self.control_setup.clone()).await?;
        *self = fresh;
        Ok(())
    }
}

fn test_config(secret: &[u8]) -> SchedulerConfig {
    SchedulerConfig {
        secret: secret.to_vec(),
        announce_interval: std::time::Duration::from_secs(2),
        ..SchedulerConfig::default()
    }
}
