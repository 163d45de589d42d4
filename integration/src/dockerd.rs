//! A private dockerd (own data root, exec root and socket in a temp dir, no bridge, no
//! iptables rules) driven with the `docker` CLI, for pulls only.

use std::collections::HashMap;
use std::net::{IpAddr, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::util::{poll_until, stop_gently};

const DOCKER_TIMEOUT: Duration = Duration::from_secs(120);

pub struct Dockerd {
    child: Child,
    dir: TempDir,
}

impl Dockerd {
    /// Starts dockerd with `env` added to its environment (`HTTPS_PROXY`, ...) and waits until
    /// `docker info` answers.
    pub async fn start(env: &HashMap<&str, String>) -> Result<Dockerd> {
        Dockerd::start_with(env, |_| Ok(())).await
    }

    /// The same, after `edit` had its way with dockerd's `daemon.json` (its path; the file
    /// holds a setting of the node's own, `max-concurrent-downloads`).
    pub async fn start_with(env: &HashMap<&str, String>, edit: impl FnOnce(&Path) -> Result<()>) -> Result<Dockerd> {
        let dir = tempfile::Builder::new().prefix("damselfly-dockerd-").tempdir()?;
        let d = dir.path();
        std::fs::write(d.join("daemon.json"), "{\n  \"max-concurrent-downloads\": 2\n}\n")?;
        edit(&d.join("daemon.json"))?;
        let log = std::fs::File::create(d.join("dockerd.log"))?;
        let mut cmd = Command::new("dockerd");
        cmd.arg("--data-root")
            .arg(d.join("root"))
            .arg("--exec-root")
            .arg(d.join("exec"))
            .arg("--pidfile")
            .arg(d.join("dockerd.pid"))
            .arg("--config-file")
            .arg(d.join("daemon.json"))
            .arg("-H")
            .arg(format!("unix://{}", d.join("docker.sock").display()))
            .args(["--bridge=none", "--iptables=false", "--ip6tables=false"]);
        for var in ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "no_proxy", "NO_PROXY"] {
            cmd.env_remove(var);
        }
        cmd.envs(env).stdin(Stdio::null()).stdout(log.try_clone()?).stderr(log);
        let child = cmd.spawn().context("spawning dockerd (run scripts/install-test-deps.sh)")?;
        let mut dockerd = Dockerd { child, dir };
        let sock = dockerd.socket();
        let log_path = dockerd.dir.path().join("dockerd.log");
        let child = &mut dockerd.child;
        poll_until("dockerd to answer `docker info`", Duration::from_secs(60), || {
            let exited = child.try_wait();
            let (sock, log_path) = (&sock, &log_path);
            async move {
                if let Ok(Some(status)) = exited {
                    bail!("dockerd exited with {status}: {}", std::fs::read_to_string(log_path).unwrap_or_default());
                }
                let host = format!("unix://{}", sock.display());
                let out = tokio::process::Command::new("docker").args(["-H", &host, "info"]).output().await?;
                Ok(out.status.success().then_some(()))
            }
        })
        .await?;
        Ok(dockerd)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("docker.sock")
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("dockerd.log")).unwrap_or_default()
    }

    /// Runs `docker -H SOCK ARGS...`; `Ok(stdout)`, or `Err` with its output and dockerd's log.
    pub async fn docker(&self, args: &[&str]) -> Result<String> {
        let host = format!("unix://{}", self.socket().display());
        let mut cmd = tokio::process::Command::new("docker");
        cmd.args(["-H", &host]).args(args).kill_on_drop(true);
        let out = tokio::time::timeout(DOCKER_TIMEOUT, cmd.output())
            .await
            .with_context(|| format!("docker {args:?} timed out"))?
            .context("running docker")?;
        if !out.status.success() {
            bail!(
                "docker {args:?} failed: {}{}\ndockerd's log:\n{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr),
                self.log()
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }
}

impl Drop for Dockerd {
    fn drop(&mut self) {
        // SIGTERM lets dockerd stop the containerd it started and unmount its layers.
        stop_gently(&mut self.child, Duration::from_secs(15));
    }
}

/// An IPv4 address of this host that is not loopback (the one its default route leaves
/// from), if it has one. Go clients never send loopback traffic through a proxy.
pub fn non_loopback_ipv4() -> Option<IpAddr> {
    let socket = UdpSocket::bind("0.0.0.0:0").ok()?;
    socket.connect("192.0.2.1:9").ok()?;
    let ip = socket.local_addr().ok()?.ip();
    (!ip.is_loopback() && !ip.is_unspecified()).then_some(ip)
}

/// A CA certificate dockerd trusts for one registry (`/etc/docker/certs.d/HOST:PORT/ca.crt`:
/// dockerd has no flag for another directory), removed on drop.
pub struct DockerTrust(PathBuf);

impl DockerTrust {
    pub fn install(registry: &str, ca_pem: &Path) -> Result<DockerTrust> {
        let dir = PathBuf::from("/etc/docker/certs.d").join(registry);
        std::fs::create_dir_all(&dir)?;
        std::fs::copy(ca_pem, dir.join("ca.crt"))?;
        Ok(DockerTrust(dir))
    }
}

impl Drop for DockerTrust {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
