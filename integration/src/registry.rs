//! A real upstream registry (`docker-registry serve`, CNCF distribution 2.8) on a free loopback
//! port, plus a parser of its access log: the ground truth for "what reached the origin".

use std::fs::{File, OpenOptions};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, ensure, Context, Result};
use bytes::Bytes;
use tempfile::TempDir;

use crate::util::{free_loopback_port, http_client, poll_until, random_token, scripts_dir};

/// A running `docker-registry` with its own storage, config and append-mode log in a temp dir.
pub struct Registry {
    child: Child,
    addr: SocketAddr,
    dir: TempDir,
    log_path: PathBuf,
    client: reqwest::Client,
    /// Serving HTTPS (with a certificate the test made).
    tls: bool,
}

/// A PEM certificate and its key.
type Tls = (PathBuf, PathBuf);

/// The client the harness talks to a registry with: its certificate is the test's own.
fn client_for(tls: bool) -> reqwest::Client {
    match tls {
        false => http_client(),
        true => reqwest::Client::builder()
            .no_proxy()
            .danger_accept_invalid_certs(true)
            .timeout(Duration::from_secs(120))
            .build()
            .expect("reqwest client"),
    }
}

/// An image pushed with [`Registry::push_image`].
#[derive(Debug, Clone)]
pub struct Image {
    pub repo: String,
    pub tag: String,
    /// `HOST/REPO:TAG` on the registry it was pushed to.
    pub reference: String,
    pub manifest_digest: String,
    pub manifest_size: u64,
    /// Config blob first, then the layers: `(digest, size)`.
    pub blobs: Vec<(String, u64)>,
}

impl Image {
    /// The largest blob (the big random layer when one was asked for).
    pub fn largest_blob(&self) -> (String, u64) {
        self.blobs.iter().max_by_key(|(_, s)| *s).cloned().expect("image has blobs")
    }
}

impl Registry {
    /// Starts a registry on a free loopback port and waits until `GET /v2/` answers 200.
    pub async fn start() -> Result<Registry> {
        Registry::start_with(None, IpAddr::from([127, 0, 0, 1]), String::new()).await
    }

    /// A registry that sends its event notifications (pushes, pulls) to `endpoint` with
    /// `Authorization: <authorization>`, as `notifications.endpoints` configures.
    pub async fn start_notifying(endpoint: &str, authorization: &str) -> Result<Registry> {
        let notify = format!(
            "notifications:\n  endpoints:\n    - name: damselfly\n      url: {endpoint}\n      \
             headers: {{Authorization: [\"{authorization}\"]}}\n      timeout: 2s\n      threshold: 3\n      \
             backoff: 1s\n"
        );
        Registry::start_with(None, IpAddr::from([127, 0, 0, 1]), notify).await
    }

    /// The same, serving HTTPS with this PEM certificate and key.
    pub async fn start_tls(cert: &Path, key: &Path) -> Result<Registry> {
        Registry::start_with(Some((cert.to_owned(), key.to_owned())), IpAddr::from([127, 0, 0, 1]), String::new()).await
    }

    /// HTTPS on `ip` (an address of this host): clients that never send loopback traffic
    /// through a proxy, such as Go's, then send it through theirs.
    pub async fn start_tls_at(ip: IpAddr, cert: &Path, key: &Path) -> Result<Registry> {
        Registry::start_with(Some((cert.to_owned(), key.to_owned())), ip, String::new()).await
    }

    /// `extra` is appended to the registry's configuration.
    async fn start_with(tls: Option<Tls>, ip: IpAddr, extra: String) -> Result<Registry> {
        let dir = tempfile::Builder::new().prefix("damselfly-registry-").tempdir()?;
        let mut last_err = anyhow!("no attempt");
        // The port is free when picked but another process may grab it before the registry
        // binds; the registry then exits, and we retry with another port.
        for _attempt in 0..5 {
            match Self::try_start(&dir, tls.as_ref(), ip, &extra).await {
                Ok((child, addr, log_path)) => {
                    let tls = tls.is_some();
                    return Ok(Registry { child, addr, dir, log_path, client: client_for(tls), tls });
                }
                Err(e) => last_err = e,
            }
        }
        Err(last_err.context("starting docker-registry"))
    }

    async fn try_start(
        dir: &TempDir,
        tls: Option<&Tls>,
        ip: IpAddr,
        extra: &str,
    ) -> Result<(Child, SocketAddr, PathBuf)> {
        let port = free_loopback_port();
        let addr = SocketAddr::new(ip, port);
        let storage = dir.path().join("storage");
        std::fs::create_dir_all(&storage)?;
        let config_path = dir.path().join("registry.yml");
        // An explicit config always: the packaged one listens on all interfaces with htpasswd
        // auth. The fixed http.secret only silences a warning.
        std::fs::write(
            &config_path,
            format!(
                "version: 0.1\n\
                 log: {{level: info}}\n\
                 storage:\n  filesystem: {{rootdirectory: {storage}}}\n  delete: {{enabled: true}}\n\
                 http:\n  addr: {addr}\n  secret: {secret}\n{tls}{extra}",
                storage = storage.display(),
                secret = random_token(),
                tls = match tls {
                    Some((cert, key)) =>
                        format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display()),
                    None => String::new(),
                },
            ),
        )?;
        // Append mode: truncating a log a live process writes leaves NUL padding.
        let log_path = dir.path().join(format!("registry-{port}.log"));
        let log = OpenOptions::new().create(true).append(true).open(&log_path)?;
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("spawning docker-registry (run scripts/install-test-deps.sh)")?;

        let client = client_for(tls.is_some());
        let url = format!("{}://{addr}/v2/", if tls.is_some() { "https" } else { "http" });
        let listening = format!("listening on {addr}");
        let ready = poll_until("docker-registry to answer GET /v2/", Duration::from_secs(20), || {
            let exited = child.try_wait();
            let client = &client;
            let url = &url;
            let log_path = &log_path;
            let listening = &listening;
            async move {
                if let Ok(Some(status)) = exited {
                    bail!("docker-registry exited with {status}: {}", read_lossy(log_path));
                }
                // Our own process must have bound the port, not somebody else answering on it.
                if !read_lossy(log_path).contains(listening.as_str()) {
                    return Ok(None);
                }
                let resp = client.get(url).send().await?;
                Ok((resp.status() == 200).then_some(()))
            }
        })
        .await;
        match ready {
            Ok(()) => Ok((child, addr, log_path)),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`, the registry host as it appears in image references and `ns=`.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT` (`https://` for a registry serving TLS)
    pub fn url(&self) -> String {
        format!("{}://{}", if self.tls { "https" } else { "http" }, self.addr)
    }

    pub fn blob_url(&self, repo: &str, digest: &str) -> String {
        format!("{}/v2/{repo}/blobs/{digest}", self.url())
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Parses the access log as it is now.
    pub fn access_log(&self) -> AccessLog {
        AccessLog::parse(&read_lossy(&self.log_path))
    }

    /// The access log once it has stopped growing for 300 ms. The registry writes a request's
    /// line after the response completes, so right after a client finishes, the line for the
    /// upstream request behind it may still be on its way.
    pub async fn settled_access_log(&self) -> AccessLog {
        let quiet = Duration::from_millis(300);
        let deadline = Instant::now() + Duration::from_secs(10);
        let len = || std::fs::metadata(&self.log_path).map(|m| m.len()).unwrap_or(0);
        let mut last_len = len();
        let mut last_change = Instant::now();
        while Instant::now() < deadline && last_change.elapsed() < quiet {
            tokio::time::sleep(Duration::from_millis(50)).await;
            let now = len();
            if now != last_len {
                last_len = now;
                last_change = Instant::now();
            }
        }
        self.access_log()
    }

    /// Builds a small random image (two tiny layers, plus a `big_mib` MiB random layer if
    /// non-zero) with `scripts/mkoci.py` and pushes it with skopeo.
    pub async fn push_image(&self, repo: &str, tag: &str, big_mib: u32) -> Result<Image> {
        self.push_layout(repo, tag, big_mib, None).await
    }

    /// Like [`Registry::push_image`], but `tag` names an image index with one image per
    /// platform (`linux/amd64,linux/arm64`), each with layers of its own; the image's blobs are
    /// those of every platform, its manifest digest the index's.
    pub async fn push_index(&self, repo: &str, tag: &str, big_mib: u32, platforms: &str) -> Result<Image> {
        self.push_layout(repo, tag, big_mib, Some(platforms)).await
    }

    async fn push_layout(&self, repo: &str, tag: &str, big_mib: u32, platforms: Option<&str>) -> Result<Image> {
        let layout = self.dir.path().join("layouts").join(random_token());
        let mut mkoci = tokio::process::Command::new("python3");
        mkoci.arg(scripts_dir().join("mkoci.py")).arg(&layout).arg(tag).arg(big_mib.to_string());
        if let Some(p) = platforms {
            mkoci.arg(p);
        }
        let out = mkoci.kill_on_drop(true).output().await.context("running mkoci.py")?;
        ensure!(out.status.success(), "mkoci.py failed: {}", String::from_utf8_lossy(&out.stderr));
        let manifest_digest = String::from_utf8(out.stdout)?.trim().to_owned();

        let reference = format!("{}/{repo}:{tag}", self.host());
        let mut skopeo = tokio::process::Command::new("skopeo");
        skopeo.args(["copy", "--dest-tls-verify=false"]);
        if platforms.is_some() {
            skopeo.arg("--all");
        }
        let out = skopeo
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{reference}"))
            .env_remove("http_proxy")
            .env_remove("HTTP_PROXY")
            .kill_on_drop(true)
            .output()
            .await
            .context("running skopeo copy")?;
        ensure!(out.status.success(), "skopeo push of {reference} failed: {}", String::from_utf8_lossy(&out.stderr));

        let read = |digest: &str| -> Result<Vec<u8>> {
            let hex = digest.strip_prefix("sha256:").context("manifest digest")?;
            Ok(std::fs::read(layout.join("blobs/sha256").join(hex))?)
        };
        let manifest_bytes = read(&manifest_digest)?;
        let top: serde_json::Value = serde_json::from_slice(&manifest_bytes)?;
        let manifests = match top["manifests"].as_array() {
            Some(children) => children
                .iter()
                .map(|c| {
                    serde_json::from_slice(&read(c["digest"].as_str().context("child digest")?)?).map_err(Into::into)
                })
                .collect::<Result<Vec<serde_json::Value>>>()?,
            None => vec![top.clone()],
        };
        let descriptor = |d: &serde_json::Value| -> Result<(String, u64)> {
            Ok((
                d["digest"].as_str().context("descriptor digest")?.to_owned(),
                d["size"].as_u64().context("descriptor size")?,
            ))
        };
        let mut blobs = Vec::new();
        for manifest in &manifests {
            blobs.push(descriptor(&manifest["config"])?);
            for layer in manifest["layers"].as_array().context("manifest layers")? {
                blobs.push(descriptor(layer)?);
            }
        }
        // The layout may hold 100 MiB; the registry has its own copy now.
        let _ = std::fs::remove_dir_all(&layout);

        // skopeo must have kept the manifest bytes, or every digest assertion would be off.
        let accept = if platforms.is_some() {
            "application/vnd.oci.image.index.v1+json"
        } else {
            "application/vnd.oci.image.manifest.v1+json"
        };
        let resp = self
            .client
            .head(format!("{}/v2/{repo}/manifests/{tag}", self.url()))
            .header("Accept", accept)
            .send()
            .await?;
        let served = resp.headers().get("docker-content-digest").and_then(|v| v.to_str().ok());
        ensure!(
            served == Some(manifest_digest.as_str()),
            "registry serves {reference} as {served:?}, layout said {manifest_digest}"
        );

        Ok(Image {
            repo: repo.to_owned(),
            tag: tag.to_owned(),
            reference,
            manifest_digest,
            manifest_size: manifest_bytes.len() as u64,
            blobs,
        })
    }

    /// Pushes `data` as a blob of `repo` with a monolithic upload (`POST` then `PUT ?digest=`);
    /// returns its digest.
    pub async fn push_blob(&self, repo: &str, data: impl Into<Bytes>) -> Result<String> {
        let data: Bytes = data.into();
        let digest = crate::util::sha256_digest(&data);
        let resp = self.client.post(format!("{}/v2/{repo}/blobs/uploads/", self.url())).send().await?;
        ensure!(resp.status() == 202, "start upload: {}", resp.status());
        let location =
            resp.headers().get("location").and_then(|v| v.to_str().ok()).context("upload Location")?.to_owned();
        let location = if location.starts_with('/') { format!("{}{location}", self.url()) } else { location };
        let sep = if location.contains('?') { '&' } else { '?' };
        // Without an explicit octet-stream Content-Type the registry parses the body as a form
        // and answers 400 DIGEST_INVALID.
        let resp = self
            .client
            .put(format!("{location}{sep}digest={digest}"))
            .header("Content-Type", "application/octet-stream")
            .body(data)
            .send()
            .await?;
        ensure!(resp.status() == 201, "finish upload: {} {}", resp.status(), resp.text().await.unwrap_or_default());
        Ok(digest)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn read_lossy(path: &Path) -> String {
    let mut buf = Vec::new();
    if let Ok(mut f) = File::open(path) {
        use std::io::Read;
        let _ = f.read_to_end(&mut buf);
    }
    String::from_utf8_lossy(&buf).into_owned()
}

/// One Apache-style access line:
/// `127.0.0.1 - - [22/Nov/2026:21:08:03 +0000] "GET /v2/x/blobs/sha256:… HTTP/1.1" 206 96 "" "curl/7.88.1"`.
/// `bytes` is the response body bytes the registry wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AccessEntry {
    pub method: String,
    pub uri: String,
    pub status: u16,
    pub bytes: u64,
    pub user_agent: String,
}

/// The parsed access log of a [`Registry`].
#[derive(Debug, Clone, Default)]
pub struct AccessLog {
    pub entries: Vec<AccessEntry>,
}

impl AccessLog {
    /// Picks the access lines out of the mixed registry output (the logrus lines around them
    /// are ignored).
    pub fn parse(text: &str) -> AccessLog {
        AccessLog { entries: text.lines().filter_map(parse_access_line).collect() }
    }

    /// Sum of body bytes of successful (200/206) GETs of `/blobs/<digest>`.
    pub fn blob_get_bytes(&self, digest: &str) -> u64 {
        let needle = format!("/blobs/{digest}");
        self.entries
            .iter()
            .filter(|e| e.method == "GET" && (e.status == 200 || e.status == 206) && e.uri.contains(&needle))
            .map(|e| e.bytes)
            .sum()
    }

    /// "Origin copies" of a blob: blob GET body bytes ÷ blob size.
    pub fn copies(&self, digest: &str, size: u64) -> f64 {
        self.blob_get_bytes(digest) as f64 / size as f64
    }

    /// Panics unless every blob in `blobs` (`(digest, size)`) reached the origin at most
    /// `max_copies` times (in body bytes), listing the offending requests.
    pub fn assert_copies_at_most(&self, blobs: &[(String, u64)], max_copies: f64) {
        for (digest, size) in blobs {
            let copies = self.copies(digest, *size);
            assert!(
                copies <= max_copies,
                "blob {digest} ({size} bytes) came from the origin {copies:.3} times (max {max_copies}); origin requests: {:#?}",
                self.matching(digest)
            );
        }
    }

    /// Like [`AccessLog::assert_copies_at_most`], besides `proofs` windows: in a cluster every
    /// node's first request for a blob asks the registry to show a window of it
    /// (`PROOF_WINDOW` bytes, or all of a smaller blob).
    pub fn assert_copies_besides_proofs(&self, blobs: &[(String, u64)], max_copies: f64, proofs: u64) {
        for (digest, size) in blobs {
            let window = damselfly_mirror::api::PROOF_WINDOW.min(*size);
            let allowed = max_copies + (proofs * window) as f64 / *size as f64;
            self.assert_copies_at_most(&[(digest.clone(), *size)], allowed);
        }
    }

    /// Number of requests with this method whose URI contains `path_substring`.
    pub fn count(&self, method: &str, path_substring: &str) -> usize {
        self.entries.iter().filter(|e| e.method == method && e.uri.contains(path_substring)).count()
    }

    /// Requests whose URI contains `path_substring`, for failure messages.
    pub fn matching(&self, path_substring: &str) -> Vec<&AccessEntry> {
        self.entries.iter().filter(|e| e.uri.contains(path_substring)).collect()
    }

    /// The GETs of `digest` that reached the origin.
    pub fn gets(&self, digest: &str) -> Vec<&AccessEntry> {
        self.matching(digest).into_iter().filter(|e| e.method == "GET").collect()
    }

    /// Whether some GET of `digest` came from a client whose user agent starts with `agent`.
    pub fn fetched_by(&self, digest: &str, agent: &str) -> bool {
        self.gets(digest).iter().any(|e| e.user_agent.starts_with(agent))
    }

    /// Whether every blob was fetched from the origin, and only by clients whose user agent
    /// starts with `agent` (`damselfly/`: nothing went around the daemon).
    pub fn blobs_fetched_only_by(&self, blobs: &[(String, u64)], agent: &str) -> bool {
        blobs.iter().all(|(digest, _)| {
            let gets = self.gets(digest);
            !gets.is_empty() && gets.iter().all(|e| e.user_agent.starts_with(agent))
        })
    }
}

fn parse_access_line(line: &str) -> Option<AccessEntry> {
    // The request line is the first quoted field after the "[date]".
    let after_date = &line[line.find("] \"")? + 3..];
    let (request, rest) = after_date.split_once('"')?;
    let mut parts = request.split(' ');
    let method = parts.next()?;
    let uri = parts.next()?;
    let proto = parts.next()?;
    if !proto.starts_with("HTTP/") || !method.bytes().all(|b| b.is_ascii_uppercase()) {
        return None;
    }
    let mut fields = rest.split_whitespace();
    let status = fields.next()?.parse().ok()?;
    let bytes = fields.next()?.parse().unwrap_or(0);
    // Then "referer" "user-agent".
    let user_agent = rest.rsplit('"').nth(1).unwrap_or_default().to_owned();
    Some(AccessEntry { method: method.to_owned(), uri: uri.to_owned(), status, bytes, user_agent })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = r#"time="2026-11-22T21:08:03.016011806Z" level=info msg="response completed" http.request.method=GET http.request.uri=/v2/ http.response.status=200 http.response.written=2
127.0.0.1 - - [22/Nov/2026:21:08:03 +0000] "GET /v2/ HTTP/1.1" 200 2 "" "curl/7.88.1"
time="2026-11-22T21:08:03.169201723Z" level=info msg="response completed" http.request.uri="/v2/test/x/blobs/sha256:5ca8" http.response.status=200 http.response.written=3000000
127.0.0.1 - - [22/Nov/2026:21:08:03 +0000] "GET /v2/test/x/blobs/sha256:5ca8 HTTP/1.1" 200 3000000 "" "curl/7.88.1"
127.0.0.1 - - [22/Nov/2026:21:08:03 +0000] "GET /v2/test/x/blobs/sha256:5ca8 HTTP/1.1" 206 96 "" "Go-http-client/1.1"
127.0.0.1 - - [22/Nov/2026:21:08:03 +0000] "HEAD /v2/test/x/blobs/sha256:5ca8 HTTP/1.1" 200 0 "" "curl/7.88.1"
127.0.0.1 - - [22/Nov/2026:21:08:03 +0000] "GET /v2/test/x/blobs/sha256:5ca8 HTTP/1.1" 404 157 "" "curl/7.88.1"
"#;

    #[test]
    fn parses_access_lines_only() {
        let log = AccessLog::parse(SAMPLE);
        assert_eq!(log.entries.len(), 5);
        assert_eq!(log.entries[2].status, 206);
        assert_eq!(log.entries[2].user_agent, "Go-http-client/1.1");
        assert_eq!(log.blob_get_bytes("sha256:5ca8"), 3_000_096);
        assert_eq!(log.count("GET", "/blobs/sha256:5ca8"), 3);
        assert_eq!(log.count("HEAD", "/blobs/"), 1);
        assert_eq!(log.count("GET", "/v2/"), 4);
    }
}
