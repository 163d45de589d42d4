//! `damselfly preheat IMAGE`: starts a preheat through the scheduler's JSON API and follows
//! it to the end, with a progress bar on a terminal (bytes held by the peers in scope, blobs,
//! peers) and a line per change otherwise.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use crate::api::v1::{JobView, NewJob};
use crate::job::Scope;

#[derive(Debug, Clone, Args)]
pub struct PreheatArgs {
    /// The image: `registry/repository:tag`, `…@sha256:…`, a Docker Hub name (`alpine`), or
    /// the manifest's URL (`https://registry/v2/<repository>/manifests/<tag>`).
    pub image: String,
    /// Which peers must hold it.
    #[arg(long, value_enum, default_value = "single_seed_peer")]
    pub scope: Scope,
    /// `os/arch[/variant]` of a multi-platform image; repeatable. Default: every platform.
    #[arg(long = "platform", value_name = "OS/ARCH")]
    pub platforms: Vec<String>,
    /// The scheduler's HTTP address.
    #[arg(long, value_name = "URL", default_value = "http://127.0.0.1:8080")]
    pub scheduler: String,
    /// File holding the API's Bearer token (the scheduler's --preheat-token-file).
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The registry speaks plain HTTP (for an image reference; a URL says it itself).
    #[arg(long)]
    pub plain_http: bool,
    /// Give up after this many seconds.
    #[arg(long, value_name = "SECS", default_value_t = 1800)]
    pub timeout: u64,
    /// Start the job and print its id without waiting.
    #[arg(long)]
    pub no_wait: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum PreheatError {
    #[error("{0}")]
    Image(String),
    #[error("cannot read {path}: {source}")]
    Token { path: PathBuf, source: std::io::Error },
    #[error("the scheduler at {url}: {reason}")]
    Api { url: String, reason: String },
    #[error("job {id} failed: {reason}")]
    Failed { id: i64, reason: String },
}

/// Runs the preheat; `Ok` once every blob is held by every peer in scope.
pub async fn run(args: &PreheatArgs) -> Result<JobView, PreheatError> {
    let url = manifest_url(&args.image, args.plain_http)?;
    let token = match &args.token_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|source| PreheatError::Token { path: path.clone(), source })?
                .trim_end()
                .to_owned(),
        ),
        None => None,
    };
    let base = args.scheduler.trim_end_matches('/').to_owned();
    let api_err = |reason: String| PreheatError::Api { url: base.clone(), reason };
    let client =
        reqwest::Client::builder().timeout(Duration::from_secs(30)).build().map_err(|e| api_err(e.to_string()))?;
    let authorized = |req: reqwest::RequestBuilder| match &token {
        Some(t) => req.bearer_auth(t),
        None => req,
    };
    let new = NewJob {
        url,
        kind: "image".to_owned(),
        scope: args.scope.as_str().to_owned(),
        platforms: args.platforms.clone(),
        timeout_secs: args.timeout,
        ..NewJob::default()
    };
    let body = serde_json::to_vec(&new).map_err(|e| api_err(e.to_string()))?;
    let post = client.post(format!("{base}/api/v1/jobs")).header(http::header::CONTENT_TYPE, "application/json");
    let created = authorized(post.body(body)).send().await;
    let mut job: JobView = reply(created, &api_err).await?;
    if args.no_wait {
        println!("{}", job.id);
        return Ok(job);
    }
    let mut show = Show::new(job.id);
    loop {
        show.update(&job);
        match job.state.as_str() {
            "SUCCESS" => {
                show.finish(&job);
                return Ok(job);
            }
            "FAILURE" => {
                show.finish(&job);
                return Err(PreheatError::Failed { id: job.id, reason: job.error });
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        let polled = authorized(client.get(format!("{base}/api/v1/jobs/{}", job.id))).send().await;
        job = reply(polled, &api_err).await?;
    }
}

async fn reply(
    sent: Result<reqwest::Response, reqwest::Error>,
    api_err: &impl Fn(String) -> PreheatError,
) -> Result<JobView, PreheatError> {
    let resp = sent.map_err(|e| api_err(e.to_string()))?;
    let status = resp.status();
    let body = resp.bytes().await.map_err(|e| api_err(e.to_string()))?;
    if !status.is_success() {
        let message = serde_json::from_slice::<serde_json::Value>(&body)
            .ok()
            .and_then(|v| v.get("errors").and_then(|e| e.as_str()).map(str::to_owned))
            .unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        return Err(api_err(format!("{status}: {message}")));
    }
    serde_json::from_slice(&body).map_err(|e| api_err(format!("unreadable reply: {e}")))
}

/// The manifest URL an image reference stands for.
pub fn manifest_url(image: &str, plain_http: bool) -> Result<String, PreheatError> {
    if image.contains("://") {
        return Ok(image.to_owned());
    }
    let bad = || PreheatError::Image(format!("{image:?} is not an image reference"));
    let (name, reference) = match image.split_once('@') {
        Some((name, digest)) => (name, digest.to_owned()),
        None => match image.rsplit_once(':') {
            Some((name, tag)) if !tag.contains('/') => (name, tag.to_owned()),
            _ => (image, "latest".to_owned()),
        },
    };
    if name.is_empty() || reference.is_empty() {
        return Err(bad());
    }
    let (registry, repository) = match name.split_once('/') {
        Some((first, rest)) if first.contains('.') || first.contains(':') || first == "localhost" => {
            (first.to_owned(), rest.to_owned())
        }
        Some(_) => ("registry-1.docker.io".to_owned(), name.to_owned()),
        None => ("registry-1.docker.io".to_owned(), format!("library/{name}")),
    };
    let scheme = if plain_http { "http" } else { "https" };
    Ok(format!("{scheme}://{registry}/v2/{repository}/manifests/{reference}"))
}

/// Progress on a terminal, lines elsewhere.
struct Show {
    bar: Option<ProgressBar>,
    last: String,
}

impl Show {
    fn new(id: i64) -> Show {
        let bar = std::io::stderr().is_terminal().then(|| {
            let bar = ProgressBar::new(0);
            let style = ProgressStyle::with_template(
                "job {prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ");
            bar.set_style(style);
            bar.set_prefix(id.to_string());
            bar
        });
        Show { bar, last: String::new() }
    }

    fn update(&mut self, job: &JobView) {
        let (total, done) = bytes(job);
        let blobs_held = job.blobs.iter().filter(|b| b.is_held()).count();
        let peers = job.blobs.first().map_or(0, |b| b.wanted);
        let summary = format!("{} · {blobs_held}/{} blobs · {peers} peers", job.state, job.blobs.len());
        match &self.bar {
            Some(bar) => {
                bar.set_length(total);
                bar.set_position(done);
                bar.set_message(summary);
            }
            None => {
                let line = format!("job {}: {summary} · {done}/{total} bytes", job.id);
                if line != self.last {
                    eprintln!("{line}");
                    self.last = line;
                }
            }
        }
    }

    fn finish(&mut self, job: &JobView) {
        self.update(job);
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
        for blob in job.blobs.iter().filter(|b| !b.error.is_empty()) {
            eprintln!("  {} {}: {}", blob.platform, blob.digest, blob.error);
        }
    }
}

/// Bytes the peers in scope must hold, and hold so far (whole blobs by their length, blobs
/// under way by their pieces).
fn bytes(job: &JobView) -> (u64, u64) {
    job.blobs.iter().fold((0u64, 0u64), |(total, done), b| {
        let want = b.length.saturating_mul(u64::from(b.wanted.max(1)));
        let have = if b.is_held() {
            want
        } else if b.piece_count > 0 {
            (u128::from(b.length) * u128::from(b.pieces_held) / u128::from(b.piece_count)).min(u128::from(want)) as u64
        } else {
            0
        };
        (total.saturating_add(want), done.saturating_add(have))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_references_become_manifest_urls() {
        let url = |s: &str| manifest_url(s, false).expect(s);
        assert_eq!(url("alpine"), "https://registry-1.docker.io/v2/library/alpine/manifests/latest");
        assert_eq!(url("org/app:1.2"), "https://registry-1.docker.io/v2/org/app/manifests/1.2");
        assert_eq!(url("ghcr.io/org/app:v1"), "https://ghcr.io/v2/org/app/manifests/v1");
        assert_eq!(url("localhost:5000/app"), "https://localhost:5000/v2/app/manifests/latest");
        let digest = "sha256:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
        assert_eq!(url(&format!("r.example/a@{digest}")), format!("https://r.example/v2/a/manifests/{digest}"));
        assert_eq!(
            manifest_url("127.0.0.1:5000/app:v1", true).expect("ok"),
            "http://127.0.0.1:5000/v2/app/manifests/v1"
        );
        assert_eq!(url("https://h/v2/a/manifests/1"), "https://h/v2/a/manifests/1");
        assert!(manifest_url("app@", false).is_err());
    }
}
