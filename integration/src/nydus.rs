//! nydusd 2.2 mounting a RAFS v6 image whose blob lives in the real registry, its registry
//! backend configured by the caller (mirror or proxy mode, as `hosts-gen nydusd` prints it).
//!
//! nydusd and nydus-image come from `scripts/install-test-deps.sh` (`cargo install nydus-rs`
//! into `~/.cache/damselfly/nydus`, or `$DAMSELFLY_NYDUS_ROOT`). FUSE needs `/dev/fuse` and
//! root: [`fuse_missing`] says why a test cannot run.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::{json, Value};
use tempfile::TempDir;

use crate::util::{poll_until, random_bytes, sha256_digest, stop_gently};
use crate::Registry;

/// Where the nydus binaries are.
pub fn nydus_bin(name: &str) -> PathBuf {
    let root = match std::env::var_os("DAMSELFLY_NYDUS_ROOT") {
        Some(r) => PathBuf::from(r),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/damselfly/nydus"),
    };
    root.join("bin").join(name)
}

/// Why nydusd cannot mount here, if it cannot.
pub fn fuse_missing() -> Option<String> {
    if !Path::new("/dev/fuse").exists() {
        return Some("no /dev/fuse".to_owned());
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("FUSE mounts need root here".to_owned());
    }
    None
}

/// A RAFS v6 image: its bootstrap on disk, its one data blob in a registry, and the sha256 of
/// every regular file it holds.
pub struct NydusImage {
    pub repo: String,
    pub blob_digest: String,
    pub blob_size: u64,
    pub bootstrap: PathBuf,
    /// Path relative to the image root, and the file's `sha256:<hex>`.
    pub files: Vec<(PathBuf, String)>,
    _dir: TempDir,
}

impl NydusImage {
    /// Builds an image of one random file of `big_mib` MiB and a few small ones, and pushes
    /// its blob to `registry` as a blob of `repo`.
    pub async fn build_and_push(registry: &Registry, repo: &str, big_mib: usize) -> Result<NydusImage> {
        let dir = tempfile::Builder::new().prefix("damselfly-nydus-image-").tempdir()?;
        let root = dir.path().join("rootfs");
        std::fs::create_dir_all(root.join("data/small"))?;
        let mut files = Vec::new();
        let mut add = |rel: &str, bytes: Vec<u8>| -> Result<()> {
            std::fs::write(root.join(rel), &bytes)?;
            files.push((PathBuf::from(rel), sha256_digest(&bytes)));
            Ok(())
        };
        add("data/big.bin", random_bytes(big_mib << 20))?;
        for (i, size) in [1usize, 700, 4096, 65_537, 300_000].into_iter().enumerate() {
            add(&format!("data/small/f{i}"), random_bytes(size))?;
        }
        let blobs = dir.path().join("blobs");
        std::fs::create_dir_all(&blobs)?;
        let bootstrap = dir.path().join("bootstrap");
        let out = Command::new(nydus_bin("nydus-image"))
            .args(["create", "-t", "dir-rafs", "-v", "6", "--compressor", "zstd", "-B"])
            .arg(&bootstrap)
            .arg("-D")
            .arg(&blobs)
            .arg(&root)
            .output()
            .context("running nydus-image (run scripts/install-test-deps.sh)")?;
        ensure!(out.status.success(), "nydus-image create: {}", String::from_utf8_lossy(&out.stderr));
        let blob = std::fs::read_dir(&blobs)?.next().context("nydus-image wrote no blob")??.path();
        let data = std::fs::read(&blob)?;
        let blob_size = data.len() as u64;
        let blob_digest = registry.push_blob(repo, data).await?;
        ensure!(
            blob.file_name().is_some_and(|n| blob_digest.ends_with(&*n.to_string_lossy())),
            "the blob's file name is not its sha256"
        );
        Ok(NydusImage { repo: repo.to_owned(), blob_digest, blob_size, bootstrap, files, _dir: dir })
    }
}

/// A running nydusd with the image mounted; unmounted and stopped on drop.
pub struct Nydusd {
    child: Child,
    mountpoint: PathBuf,
    dir: TempDir,
}

impl Nydusd {
    /// Mounts `image` with `backend` as the registry backend (`device.backend`) and an empty
    /// blob cache, and waits until its files can be listed.
    pub async fn mount(image: &NydusImage, backend: Value) -> Result<Nydusd> {
        let dir = tempfile::Builder::new().prefix("damselfly-nydusd-").tempdir()?;
        let (mountpoint, cache) = (dir.path().join("mnt"), dir.path().join("cache"));
        std::fs::create_dir_all(&mountpoint)?;
        std::fs::create_dir_all(&cache)?;
        let config = json!({
            "device": {
                "backend": backend,
                "cache": { "type": "blobcache", "config": { "work_dir": cache } },
            },
            "mode": "direct",
            "digest_validate": false,
            "iostats_files": false,
            "enable_xattr": true,
        });
        let config_file = dir.path().join("nydusd.json");
        std::fs::write(&config_file, serde_json::to_vec_pretty(&config)?)?;
        let log = std::fs::File::create(dir.path().join("nydusd.log"))?;
        // Without --rlimit-nofile 0 nydusd asks for a million descriptors and exits with EPERM.
        let child = Command::new(nydus_bin("nydusd"))
            .arg("--config")
            .arg(&config_file)
            .arg("--mountpoint")
            .arg(&mountpoint)
            .arg("--bootstrap")
            .arg(&image.bootstrap)
            .arg("--apisock")
            .arg(dir.path().join("api.sock"))
            .args(["--rlimit-nofile", "0", "--log-level", "info"])
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .env_remove("https_proxy")
            .env_remove("HTTPS_PROXY")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning nydusd (run scripts/install-test-deps.sh)")?;
        let mut nydusd = Nydusd { child, mountpoint, dir };
        let probe = nydusd.mountpoint.join(&image.files[0].0);
        let child = &mut nydusd.child;
        let log = nydusd.dir.path().join("nydusd.log");
        poll_until("nydusd to mount the image", Duration::from_secs(30), || {
            let exited = child.try_wait();
            let (probe, log) = (&probe, &log);
            async move {
                if let Ok(Some(status)) = exited {
                    bail!("nydusd exited with {status}: {}", std::fs::read_to_string(log).unwrap_or_default());
                }
                Ok(probe.exists().then_some(()))
            }
        })
        .await?;
        Ok(nydusd)
    }

    /// Reads every file of `image` through the mount; `Err` names the first whose content
    /// differs from the source.
    pub async fn check_files(&self, image: &NydusImage) -> Result<()> {
        for (rel, want) in &image.files {
            let path = self.mountpoint.join(rel);
            let got = tokio::task::spawn_blocking(move || std::fs::read(path)).await??;
            let got = sha256_digest(&got);
            ensure!(&got == want, "{} reads as {got}, not {want}; nydusd's log:\n{}", rel.display(), self.log());
        }
        Ok(())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("nydusd.log")).unwrap_or_default()
    }
}

impl Drop for Nydusd {
    fn drop(&mut self) {
        // SIGTERM makes nydusd unmount; a mount it leaves behind is detached.
        stop_gently(&mut self.child, Duration::from_secs(5));
        let _ = Command::new("umount").arg("-l").arg(&self.mountpoint).stderr(Stdio::null()).status();
    }
}
