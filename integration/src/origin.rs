//! A real web server for files that have no registry (nginx, as the test dependencies install
//! it) on a free loopback port: static files with the `ETag` and `Last-Modified` nginx gives
//! them, a `/private/` folder behind a Bearer token, and an access log to tell what reached
//! the origin.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use tempfile::TempDir;

use crate::util::{free_loopback_port, http_client, poll_until};

const NGINX: &str = "/usr/sbin/nginx";

/// The token `/private/` files need (`Authorization: Bearer <token>`).
pub const PRIVATE_TOKEN: &str = "origin-private-token";

pub struct FileServer {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
}

/// One line of the access log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub method: String,
    pub uri: String,
    pub status: u16,
    pub bytes: u64,
}

impl FileServer {
    pub async fn start() -> Result<FileServer> {
        let dir = tempfile::Builder::new().prefix("damselfly-origin-").tempdir()?;
        std::fs::create_dir_all(dir.path().join("files/private"))?;
        std::fs::write(dir.path().join("files/ready.txt"), b"ready")?;
        let mut last = anyhow!("no attempt");
        // The port may be taken between picking and binding: nginx then exits; try another.
        for _ in 0..5 {
            match start_at(&dir, free_loopback_port()).await {
                Ok((child, addr)) => return Ok(FileServer { child, addr, dir }),
                Err(e) => last = e,
            }
        }
        Err(last.context("starting nginx (run scripts/install-test-deps.sh)"))
    }

    /// Writes a file the origin serves at `/<name>`.
    pub fn put(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let path = self.dir.path().join("files").join(name);
        std::fs::write(path, bytes)?;
        Ok(())
    }

    /// Sets the modification time of `/<name>` (which nginx's `ETag` and `Last-Modified` show).
    pub fn touch(&self, name: &str, at: std::time::SystemTime) -> Result<()> {
        let file = std::fs::File::options().write(true).open(self.dir.path().join("files").join(name))?;
        file.set_modified(at)?;
        Ok(())
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://{}/{name}", self.addr)
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request the origin answered so far.
    pub fn access_log(&self) -> Vec<Access> {
        let text = std::fs::read_to_string(self.dir.path().join("access.log")).unwrap_or_default();
        text.lines()
            .filter_map(|line| {
                let mut f = line.split(' ');
                Some(Access {
                    method: f.next()?.to_owned(),
                    uri: f.next()?.to_owned(),
                    status: f.next()?.parse().ok()?,
                    bytes: f.next()?.parse().ok()?,
                })
            })
            .collect()
    }

    /// Requests for `/<name>` with `method`.
    pub fn requests(&self, method: &str, name: &str) -> Vec<Access> {
        let uri = format!("/{name}");
        self.access_log().into_iter().filter(|a| a.method == method && a.uri == uri).collect()
    }
}

impl Drop for FileServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start_at(dir: &TempDir, port: u16) -> Result<(Child, SocketAddr)> {
    let root = dir.path();
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    for d in ["client_body", "proxy", "fastcgi", "uwsgi", "scgi"] {
        std::fs::create_dir_all(root.join("temp").join(d))?;
    }
    // nginx's workers run as nobody under root, and could not read the test's private dir.
    let user = if unsafe { libc::geteuid() } == 0 { "user root root;" } else { "" };
    let p = |rel: &str| -> PathBuf { root.join(rel) };
    let conf = format!(
        "{user}
worker_processes 1;
pid {pid};
error_log {error} warn;
events {{ worker_connections 256; }}
http {{
    log_format files '$request_method $uri $status $body_bytes_sent';
    access_log {access} files;
    default_type application/octet-stream;
    types {{ }}
    client_body_temp_path {t}/client_body;
    proxy_temp_path {t}/proxy;
    fastcgi_temp_path {t}/fastcgi;
    uwsgi_temp_path {t}/uwsgi;
    scgi_temp_path {t}/scgi;
    server {{
        listen {addr};
        root {files};
        location /private/ {{
            if ($http_authorization != \"Bearer {PRIVATE_TOKEN}\") {{ return 401; }}
        }}
    }}
}}
",
        pid = p("nginx.pid").display(),
        error = p("error.log").display(),
        access = p("access.log").display(),
        t = p("temp").display(),
        files = p("files").display(),
    );
    let conf_path = p(&format!("nginx-{port}.conf"));
    std::fs::write(&conf_path, conf)?;
    let mut child = Command::new(NGINX)
        .arg("-c")
        .arg(&conf_path)
        .arg("-p")
        .arg(format!("{}/", root.display()))
        .arg("-e")
        .arg(p("error.log"))
        .args(["-g", "daemon off;"])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("spawning {NGINX}"))?;
    let url = format!("http://{addr}/ready.txt");
    let client = http_client();
    let ready = poll_until("nginx to answer", Duration::from_secs(10), || {
        let exited = child.try_wait();
        let (client, url) = (&client, &url);
        let error_log = p("error.log");
        async move {
            if let Ok(Some(status)) = exited {
                bail!("nginx exited with {status}: {}", read(&error_log));
            }
            let resp = client.get(url).send().await;
            Ok(resp.is_ok_and(|r| r.status() == 200).then_some(()))
        }
    })
    .await;
    match ready {
        Ok(()) => Ok((child, addr)),
        Err(e) => {
            let _ = child.kill();
            let _ = child.wait();
            Err(e)
        }
    }
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}
