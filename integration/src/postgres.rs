//! A real PostgreSQL server for the shared job store: Debian's `postgresql` binaries, a
//! private cluster in a temp dir on a free loopback port, run as the `postgres` user when the
//! tests run as root (the server refuses root), trust auth on loopback only.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use tempfile::TempDir;

use crate::util::{free_loopback_port, poll_until};

pub struct Postgres {
    child: Child,
    port: u16,
    _dir: TempDir,
}

/// The newest installed server's bin directory.
fn bin_dir() -> Result<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (run scripts/install-test-deps.sh)")?
        .filter_map(|e| e.ok())
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin)| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin).context("no PostgreSQL server in /usr/lib/postgresql")
}

/// The uid and gid to run the server as: `postgres` when we are root, else ourselves.
fn server_user() -> Result<Option<(u32, u32)>> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Ok(None);
    }
    let name = std::ffi::CString::new("postgres")?;
    // SAFETY: a valid C string; the returned record is read at once, before another call.
    let pw = unsafe { libc::getpwnam(name.as_ptr()) };
    if pw.is_null() {
        bail!("no postgres user (install Debian's postgresql package)");
    }
    // SAFETY: non-null pointer to a passwd record.
    Ok(Some(unsafe { ((*pw).pw_uid, (*pw).pw_gid) }))
}

impl Postgres {
    pub async fn start() -> Result<Postgres> {
        let bin = bin_dir()?;
        let user = server_user()?;
        let dir = tempfile::Builder::new().prefix("damselfly-postgres-").tempdir()?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))?;
        }
        let data = dir.path().join("data");
        let as_server = |cmd: &mut Command| {
            if let Some((uid, gid)) = user {
                cmd.uid(uid).gid(gid);
            }
        };
        let mut initdb = Command::new(bin.join("initdb"));
        initdb.arg("-D").arg(&data).args(["-U", "damselfly", "--auth=trust", "--no-sync", "-E", "UTF8"]);
        as_server(&mut initdb);
        let out = initdb.output().context("running initdb")?;
        if !out.status.success() {
            bail!("initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let port = free_loopback_port();
        let log = std::fs::File::create(dir.path().join("postgres.log"))?;
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path().join("postgres.log"), Some(uid), Some(gid))?;
        }
        let mut server = Command::new(bin.join("postgres"));
        server
            .arg("-D")
            .arg(&data)
            .args(["-p", &port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .arg("-k")
            .arg(dir.path())
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log);
        as_server(&mut server);
        let mut child = server.spawn().context("starting postgres")?;
        let log_path = dir.path().join("postgres.log");
        let ready = poll_until("postgres to accept connections", Duration::from_secs(30), || {
            let exited = child.try_wait();
            let log_path = log_path.clone();
            async move {
                if let Ok(Some(status)) = exited {
                    bail!("postgres exited with {status}: {}", std::fs::read_to_string(&log_path).unwrap_or_default());
                }
                let up = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok();
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                Ok((up && log.contains("ready to accept connections")).then_some(()))
            }
        })
        .await;
        if let Err(e) = ready {
            let _ = child.kill();
            let _ = child.wait();
            return Err(e);
        }
        Ok(Postgres { child, port, _dir: dir })
    }

    /// The URL schedulers are given (`--job-store`).
    pub fn url(&self) -> String {
        format!("postgres://damselfly@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        // SIGQUIT: immediate shutdown, nothing to keep.
        // SAFETY: signalling our own child by pid.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGQUIT) };
        let _ = self.child.wait();
    }
}
