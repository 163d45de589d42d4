//! A cluster on one machine: a scheduler on 127.0.0.1 and node daemons on 127.0.0.2, .3, ...
//! (distinct addresses, as distinct hosts would have), all in this process.

use std::net::IpAddr;

use anyhow::Result;

use crate::metrics::Metrics;
use crate::mirror::{Mirror, MirrorOpts};
use crate::registry::Registry;
use crate::scheduler::Scheduler;

/// The cluster secret the test schedulers and nodes share, so tests can mint tokens and
/// membership proofs of their own.
pub const SECRET: &[u8] = b"damselfly-integration-test-secret";

/// A file holding [`SECRET`], as nodes are given it (`secret_file`); one per test process.
pub fn secret_file() -> &'static std::path::Path {
    static FILE: std::sync::OnceLock<tempfile::TempPath> = std::sync::OnceLock::new();
    FILE.get_or_init(|| {
        let mut f = tempfile::Builder::new().prefix("damselfly-secret-").tempfile().expect("secret file");
        std::io::Write::write_all(&mut f, SECRET).expect("write the secret");
        f.into_temp_path()
    })
}

pub struct Cluster {
    pub schedulers: Vec<Scheduler>,
    pub nodes: Vec<Option<Mirror>>,
}

impl Cluster {
    /// `schedulers` schedulers and `nodes` node daemons pulling from `origin`. `tweak` adjusts
    /// node `i`'s options (rate limits, seed).
    pub async fn start(
        origin: &Registry,
        schedulers: usize,
        nodes: usize,
        tweak: impl Fn(usize, MirrorOpts) -> MirrorOpts,
    ) -> Result<Cluster> {
        let mut scheds = Vec::new();
        for _ in 0..schedulers {
            scheds.push(Scheduler::start([127, 0, 0, 1], SECRET).await?);
        }
        Self::start_with(origin, scheds, nodes, tweak).await
    }

    /// The same with schedulers the caller started (with a control plane, say).
    pub async fn start_with(
        origin: &Registry,
        scheds: Vec<Scheduler>,
        nodes: usize,
        tweak: impl Fn(usize, MirrorOpts) -> MirrorOpts,
    ) -> Result<Cluster> {
        crate::util::init_logs();
        let urls: Vec<String> = scheds.iter().map(Scheduler::url).collect();
        let mut started = Vec::new();
        for i in 0..nodes {
            let opts = MirrorOpts::new(&origin.url()).cluster(node_ip(i), &urls, &node_id(i));
            started.push(Some(Mirror::start(tweak(i, opts)).await?));
        }
        Ok(Cluster { schedulers: scheds, nodes: started })
    }

    pub fn node(&self, i: usize) -> &Mirror {
        self.nodes[i].as_ref().expect("node was stopped")
    }

    /// Node `i`'s metrics (0 for a stopped node).
    pub async fn metrics(&self, i: usize) -> Result<Metrics> {
        match &self.nodes[i] {
            Some(n) => n.metrics().await,
            None => Ok(Metrics::default()),
        }
    }

    /// Waits until every scheduler knows at least `hosts` hosts (tests announce every 2 s).
    pub async fn wait_for_hosts(&self, hosts: f64) -> Result<()> {
        for s in &self.schedulers {
            let url = s.metrics_url();
            crate::util::poll_until("hosts announced to the scheduler", std::time::Duration::from_secs(15), || {
                let url = url.clone();
                async move {
                    let m = Metrics::scrape(&url).await?;
                    Ok((m.sum("damselfly_scheduler_hosts", &[]) >= hosts).then_some(()))
                }
            })
            .await?;
        }
        Ok(())
    }

    /// Stops node `i` as a crash would.
    pub async fn kill(&mut self, i: usize) {
        if let Some(n) = self.nodes[i].take() {
            n.kill().await;
        }
    }

    pub async fn shutdown(mut self) {
        for n in self.nodes.iter_mut() {
            if let Some(n) = n.take() {
                n.shutdown().await;
            }
        }
        for s in self.schedulers.iter_mut() {
            s.stop().await;
        }
    }
}

/// 127.0.0.2 for node 0, and so on.
pub fn node_ip(i: usize) -> IpAddr {
    IpAddr::from([127, 0, 0, 2 + i as u8])
}

pub fn node_id(i: usize) -> String {
    format!("node-{i}")
}
