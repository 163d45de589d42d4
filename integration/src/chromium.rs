//! Headless Chromium (Debian's `chromium`), driven over the DevTools protocol: load a page,
//! evaluate script in it (read what it shows, fill and submit a form as a user would), size
//! the viewport like a phone, and take screenshots.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use base64::Engine;
use futures_util::{SinkExt, StreamExt};
use serde_json::{json, Value};
use tempfile::TempDir;
use tokio_tungstenite::tungstenite::Message;

use crate::util::poll_until;

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

pub struct Browser {
    child: Child,
    _profile: TempDir,
    socket: Socket,
    next_id: u64,
}

/// Whether the browser can run here; tests print SKIPPED otherwise.
pub fn chromium_missing() -> Option<String> {
    match Command::new("chromium").arg("--version").output() {
        Ok(out) if out.status.success() => None,
        _ => Some("chromium is not installed (run scripts/install-test-deps.sh)".to_owned()),
    }
}

impl Browser {
    /// A headless browser with a fresh profile and one blank page.
    pub async fn start() -> Result<Browser> {
        let profile = tempfile::Builder::new().prefix("damselfly-chromium-").tempdir()?;
        let child = Command::new("chromium")
            .args(["--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run", "--no-proxy-server"])
            .args(["--remote-debugging-port=0", "--remote-debugging-address=127.0.0.1"])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting chromium")?;
        let port_file = profile.path().join("DevToolsActivePort");
        let port: u16 = poll_until("chromium's DevTools port", Duration::from_secs(30), || {
            let f = port_file.clone();
            async move { Ok(std::fs::read_to_string(&f).ok().and_then(|t| t.lines().next()?.parse().ok())) }
        })
        .await?;
        let list_url = format!("http://127.0.0.1:{port}/json/list");
        let page_ws = poll_until("chromium's page target", Duration::from_secs(15), || {
            let url = list_url.clone();
            async move {
                let text = crate::util::http_client().get(&url).send().await?.text().await?;
                let targets: Vec<Value> = serde_json::from_str(&text)?;
                Ok(targets
                    .iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str().map(str::to_owned)))
            }
        })
        .await?;
        let (socket, _) = tokio_tungstenite::connect_async(page_ws.as_str()).await.context("DevTools socket")?;
        let mut browser = Browser { child, _profile: profile, socket, next_id: 0 };
        browser.call("Page.enable", json!({})).await?;
        browser.call("Runtime.enable", json!({})).await?;
        Ok(browser)
    }

    /// Sends one DevTools command and waits for its result.
    pub async fn call(&mut self, method: &str, params: Value) -> Result<Value> {
        self.next_id += 1;
        let id = self.next_id;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        self.socket.send(Message::Text(msg.into())).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let next = tokio::time::timeout_at(deadline, self.socket.next()).await.context("DevTools reply")?;
            let Some(frame) = next else { bail!("DevTools socket closed") };
            let Message::Text(text) = frame? else { continue };
            let reply: Value = serde_json::from_str(&text)?;
            if reply["id"] == id {
                if let Some(err) = reply.get("error") {
                    bail!("{method}: {err}");
                }
                return Ok(reply["result"].clone());
            }
        }
    }

    /// A viewport of `width` × `height` CSS pixels; `mobile` as a phone would report.
    pub async fn viewport(&mut self, width: u32, height: u32, mobile: bool) -> Result<()> {
        let params = json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": mobile});
        self.call("Emulation.setDeviceMetricsOverride", params).await.map(drop)
    }

    pub async fn navigate(&mut self, url: &str) -> Result<()> {
        self.call("Page.navigate", json!({"url": url})).await.map(drop)
    }

    /// The value of a script expression (awaited if it is a promise).
    pub async fn eval(&mut self, expression: &str) -> Result<Value> {
        let params = json!({"expression": expression, "returnByValue": true, "awaitPromise": true});
        let result = self.call("Runtime.evaluate", params).await?;
        if let Some(e) = result.get("exceptionDetails") {
            bail!("{expression}: {e}");
        }
        Ok(result["result"]["value"].clone())
    }

    /// Waits until `expression` is truthy.
    pub async fn wait_for(&mut self, what: &str, expression: &str, timeout: Duration) -> Result<()> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let v = self.eval(expression).await.unwrap_or(Value::Null);
            if !matches!(v, Value::Null | Value::Bool(false)) && v != json!("") && v != json!(0) {
                return Ok(());
            }
            if tokio::time::Instant::now() >= deadline {
                bail!("timed out after {timeout:?} waiting for {what} ({expression})");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// A PNG of the whole page at `path`.
    pub async fn screenshot(&mut self, path: &Path) -> Result<()> {
        let shot = self.call("Page.captureScreenshot", json!({"format": "png", "captureBeyondViewport": true})).await?;
        let data = shot["data"].as_str().context("screenshot data")?;
        let png = base64::engine::general_purpose::STANDARD.decode(data)?;
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(path, png)?;
        Ok(())
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Where tests keep what a person may want to look at afterwards: `target/test-artifacts`.
pub fn artifacts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/test-artifacts")
}
