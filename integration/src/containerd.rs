//! A private containerd 1.6 (own root, state and socket in a temp dir) driven with `ctr`, or
//! through its CRI plugin as kubelet drives it.
//!
//! `ctr` resolves and fetches inside the ctr process, using the `hosts.toml` files under
//! `--hosts-dir`; the daemon only stores content and unpacks. The CRI plugin resolves and
//! fetches inside containerd, reading the hosts files only where its config's
//! `registry.config_path` points. Blobs already in the content store are never fetched again,
//! hence [`Containerd::fresh`] for a cold second pull.

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::util::poll_until;

const NAMESPACE: &str = "damselfly-test";
const CTR_TIMEOUT: Duration = Duration::from_secs(90);

pub struct Containerd {
    child: Child,
    dir: TempDir,
}

/// A file under `d`, as the config names it.
fn under(d: &Path, name: &str) -> String {
    d.join(name).display().to_string()
}

impl Containerd {
    /// Starts containerd with everything under a temp dir and waits until `ctr version` works.
    /// The CRI plugin is disabled: ctr does not use it, and it only adds start-up time and CNI
    /// noise. ctr reads registry hosts from --hosts-dir.
    pub async fn start() -> Result<Containerd> {
        let dir = tempfile::Builder::new().prefix("damselfly-ctd-").tempdir()?;
        let config = base_config(dir.path(), &["\"io.containerd.grpc.v1.cri\","])?;
        std::fs::write(dir.path().join("config.toml"), config)?;
        Containerd::spawn(dir).await
    }

    /// Starts containerd with its CRI plugin, from a config as a node has before `hosts-gen`:
    /// CRI settings of its own (a comment, a sandbox image) and no `registry` table, so the
    /// plugin reads no hosts files. `edit` may change `config.toml` (its path) and the hosts
    /// directory (see [`Containerd::hosts_dir`]) before containerd reads them.
    pub async fn start_cri(edit: impl FnOnce(&Path, &Path) -> Result<()>) -> Result<Containerd> {
        let dir = tempfile::Builder::new().prefix("damselfly-cri-").tempdir()?;
        let mut config = base_config(dir.path(), &[])?;
        config.push_str(
            "\n# the node's own CRI settings\n[plugins.\"io.containerd.grpc.v1.cri\"]\n  sandbox_image = \"registry.invalid/pause:3.9\"\n",
        );
        let file = dir.path().join("config.toml");
        std::fs::write(&file, config)?;
        edit(&file, &dir.path().join("certs.d"))?;
        Containerd::spawn(dir).await
    }

    async fn spawn(dir: TempDir) -> Result<Containerd> {
        let d = dir.path();
        let log = OpenOptions::new().create(true).append(true).open(d.join("containerd.log"))?;
        let child = Command::new("containerd")
            .arg("--config")
            .arg(d.join("config.toml"))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning containerd (run scripts/install-test-deps.sh)")?;
        let mut ctd = Containerd { child, dir };

        let sock = ctd.socket();
        let log_path = ctd.log_path();
        let child = &mut ctd.child;
        poll_until("containerd to answer `ctr version`", Duration::from_secs(30), || {
            let exited = child.try_wait();
            let sock = &sock;
            let log_path = &log_path;
            async move {
                if let Ok(Some(status)) = exited {
                    bail!("containerd exited with {status}: {}", std::fs::read_to_string(log_path).unwrap_or_default());
                }
                if !sock.exists() {
                    return Ok(None);
                }
                let out = tokio::process::Command::new("ctr")
                    .arg("-a")
                    .arg(sock)
                    .arg("version")
                    .kill_on_drop(true)
                    .output()
                    .await?;
                Ok(out.status.success().then_some(()))
            }
        })
        .await?;
        Ok(ctd)
    }

    /// Pulls `image_ref` through the CRI ImageService, as kubelet does (`scripts/cri-pull.py`
    /// with the test venv's `container-runtime-interface-api`). `Err` carries its stderr.
    pub async fn cri_pull(&self, image_ref: &str) -> Result<String> {
        let venv = match std::env::var_os("DAMSELFLY_TEST_VENV") {
            Some(v) => PathBuf::from(v),
            None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/damselfly/test-venv"),
        };
        let mut cmd = tokio::process::Command::new(venv.join("bin/python"));
        cmd.arg(crate::util::scripts_dir().join("cri-pull.py")).arg(self.socket()).arg(image_ref);
        for var in ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
            cmd.env_remove(var);
        }
        cmd.kill_on_drop(true);
        let out = tokio::time::timeout(CTR_TIMEOUT, cmd.output())
            .await
            .with_context(|| format!("CRI pull of {image_ref} timed out after {CTR_TIMEOUT:?}"))?
            .with_context(|| format!("running {} (run scripts/install-test-deps.sh)", venv.display()))?;
        if !out.status.success() {
            bail!("{}\ncontainerd's log:\n{}", String::from_utf8_lossy(&out.stderr), self.log_tail());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// A second containerd with a fresh root and a copy of this one's `hosts.toml` files: a
    /// "second node" that has nothing cached.
    pub async fn fresh(&self) -> Result<Containerd> {
        let other = Containerd::start().await?;
        copy_dir(&self.hosts_dir(), &other.hosts_dir())?;
        Ok(other)
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("containerd.sock")
    }

    pub fn hosts_dir(&self) -> PathBuf {
        self.dir.path().join("certs.d")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("containerd.log")
    }

    /// Writes `certs.d/<registry_host>/hosts.toml`: `server = server_url`, plus the mirror as a
    /// pull+resolve host tried first.
    pub fn write_hosts_toml(&self, registry_host: &str, server_url: &str, mirror_url: &str) -> Result<()> {
        self.write_hosts(
            registry_host,
            &format!(
                "server = \"{server_url}\"\n\n[host.\"{mirror_url}\"]\n  capabilities = [\"pull\", \"resolve\"]\n"
            ),
        )
    }

    /// Writes `certs.d/<registry_host>/hosts.toml` with only `server`: a direct pull.
    pub fn write_hosts_toml_direct(&self, registry_host: &str, server_url: &str) -> Result<()> {
        self.write_hosts(registry_host, &format!("server = \"{server_url}\"\n"))
    }

    fn write_hosts(&self, registry_host: &str, content: &str) -> Result<()> {
        let dir = self.hosts_dir().join(registry_host);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join("hosts.toml"), content)?;
        Ok(())
    }

    /// `ctr images pull --hosts-dir` (fetch and unpack). `Err` carries ctr's output.
    pub async fn pull(&self, image_ref: &str) -> Result<String> {
        self.ctr(&["images", "pull", "--hosts-dir", &self.hosts_dir().to_string_lossy(), image_ref]).await
    }

    /// `ctr content fetch --hosts-dir` (fetch only, no snapshotter involved).
    pub async fn fetch_content(&self, image_ref: &str) -> Result<String> {
        self.ctr(&["content", "fetch", "--hosts-dir", &self.hosts_dir().to_string_lossy(), image_ref]).await
    }

    /// Runs `ctr -a SOCK -n NS ARGS...`; `Ok(stdout)` or `Err` with stdout and stderr.
    pub async fn ctr(&self, args: &[&str]) -> Result<String> {
        let mut cmd = tokio::process::Command::new("ctr");
        cmd.arg("-a").arg(self.socket()).args(["-n", NAMESPACE]).args(args);
        // Proxies from the environment must not capture loopback test traffic.
        for var in ["http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"] {
            cmd.env_remove(var);
        }
        cmd.kill_on_drop(true);
        let out = tokio::time::timeout(CTR_TIMEOUT, cmd.output())
            .await
            .with_context(|| format!("ctr {args:?} timed out after {CTR_TIMEOUT:?}"))?
            .context("running ctr")?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        if !out.status.success() {
            bail!(
                "ctr {args:?} failed ({}):\nstdout: {stdout}\nstderr: {}",
                out.status,
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(stdout)
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What every instance's config has: its own root, state and sockets under `d`, the plugins
/// that cannot run here disabled (and `extra_disabled`), and the opt plugin kept out of /opt.
fn base_config(d: &Path, extra_disabled: &[&str]) -> Result<String> {
    std::fs::create_dir_all(d.join("certs.d"))?;
    let disabled = extra_disabled.iter().map(|p| format!("  {p}\n")).collect::<String>();
    Ok(format!(
        r#"version = 2
root = "{root}"
state = "{state}"
disabled_plugins = [
{disabled}  "io.containerd.snapshotter.v1.devmapper",
  "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.zfs",
  "io.containerd.snapshotter.v1.aufs",
]
[grpc]
  address = "{sock}"
[ttrpc]
  address = "{sock}.ttrpc"
[plugins."io.containerd.internal.v1.opt"]
  path = "{opt}"
"#,
        root = under(d, "root"),
        state = under(d, "state"),
        sock = under(d, "containerd.sock"),
        opt = under(d, "opt"),
    ))
}

fn copy_dir(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), target)?;
        }
    }
    Ok(())
}
