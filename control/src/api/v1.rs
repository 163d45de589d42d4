//! The JSON API `damselfly preheat` and the console read: jobs with their per-blob progress,
//! and the cluster as this scheduler sees it.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use damselfly_scheduler::{HostView, TaskView};
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::{Deserialize, Serialize};

use super::{json, page, parse, parse_id, rfc3339, Api, ApiError};
use crate::job::{
    registry_headers, BlobProgress, Job, JobId, JobSpec, Origin, PeerResult, Scope, Summary, Target,
    DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT, MAX_TIMEOUT,
};

/// Tasks the cluster view lists.
const MAX_TASKS: usize = 200;

/// A job as the CLI and console show it.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct JobView {
    pub id: i64,
    pub state: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub url: String,
    pub scope: String,
    pub platforms: Vec<String>,
    pub origin: String,
    pub created_at: String,
    pub updated_at: String,
    pub error: String,
    /// Which scheduler runs (or ran) it: `<its HTTP address>#<n>`.
    pub runner: String,
    pub summary: Summary,
    /// Each blob and its progress; empty in lists (see `summary`).
    pub blobs: Vec<BlobProgress>,
    pub peers: Vec<PeerResult>,
}

/// What `POST /api/v1/jobs` takes.
#[derive(Serialize, Deserialize, Debug, Clone, Default)]
pub struct NewJob {
    pub url: String,
    #[serde(rename = "type", default)]
    pub kind: String,
    #[serde(default)]
    pub scope: String,
    #[serde(default)]
    pub platforms: Vec<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
    #[serde(default)]
    pub timeout_secs: u64,
}

/// A scheduler serving this control plane's job store.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct SchedulerRow {
    /// Its HTTP address.
    pub address: String,
    /// `sqlite` or `postgres`.
    pub job_store: String,
    /// Whether it ran one of the recent jobs.
    pub runs_jobs: bool,
}

/// `GET /api/v1/cluster`.
#[derive(Serialize, Debug, Clone, PartialEq)]
pub struct ClusterView {
    /// This scheduler first, then the others that ran recent jobs from the same store.
    pub schedulers: Vec<SchedulerRow>,
    pub hosts: Vec<HostView>,
    pub tasks: Vec<TaskView>,
}

pub fn view(job: &Job, summary: Summary) -> JobView {
    JobView {
        id: job.id.0,
        state: job.state.as_str().to_owned(),
        kind: job.spec.target.as_str().to_owned(),
        url: job.spec.url.clone(),
        scope: job.spec.scope.as_str().to_owned(),
        platforms: job.spec.platforms.clone(),
        origin: job.spec.origin.as_str().to_owned(),
        created_at: rfc3339(job.created_ms),
        updated_at: rfc3339(job.updated_ms),
        error: job.error.clone(),
        runner: job.runner.clone(),
        summary,
        blobs: job.blobs.clone(),
        peers: job.peers.clone(),
    }
}

pub(super) async fn create(api: &Api, body: Bytes) -> Result<Response<Full<Bytes>>, ApiError> {
    let spec = spec(&body)?;
    let id = api.create(&spec).await?;
    let job = api.store.get(id).await?.ok_or_else(|| ApiError::NoJob(id.to_string()))?;
    Ok(json(StatusCode::CREATED, &view(&job, summarize(&job.blobs))))
}

/// The job a request body asks for, checked.
pub(super) fn spec(body: &[u8]) -> Result<JobSpec, ApiError> {
    let req: NewJob = parse(body)?;
    let bad = |m: String| ApiError::Unprocessable(m);
    let target = match req.kind.as_str() {
        "" => Target::Image,
        k => Target::parse(k).ok_or_else(|| bad(format!("type {k:?} must be \"image\" or \"file\"")))?,
    };
    let scope = Scope::parse(&req.scope).ok_or_else(|| bad(format!("scope {:?} is not a scope", req.scope)))?;
    if req.url.trim().is_empty() {
        return Err(bad("url is required".to_owned()));
    }
    let timeout = match req.timeout_secs {
        0 => DEFAULT_TIMEOUT,
        s if Duration::from_secs(s) <= MAX_TIMEOUT => Duration::from_secs(s),
        s => return Err(bad(format!("timeout_secs {s} is above {}", MAX_TIMEOUT.as_secs()))),
    };
    if req.platforms.iter().any(|p| p.split('/').count() < 2 || p.len() > 64) {
        return Err(bad("platforms read os/arch[/variant]".to_owned()));
    }
    Ok(JobSpec {
        target,
        url: req.url.trim().to_owned(),
        headers: registry_headers(req.headers),
        scope,
        platforms: req.platforms,
        concurrency: DEFAULT_CONCURRENCY,
        timeout,
        origin: Origin::Api,
    })
}

pub(super) async fn get(api: &Api, id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let job = api.store.get(parse_id(id)?).await?.ok_or_else(|| ApiError::NoJob(id.to_owned()))?;
    Ok(json(StatusCode::OK, &view(&job, summarize(&job.blobs))))
}

/// Newest first, each with its blobs summed up (one query for all).
pub(super) async fn list(api: &Api, query: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let (limit, offset) = page(query);
    let jobs = api.store.list(limit.min(100), offset).await?;
    let ids: Vec<JobId> = jobs.iter().map(|j| j.id).collect();
    let summaries = api.store.summaries(&ids).await?;
    let views = jobs.iter().map(|j| view(j, summaries.get(&j.id).copied().unwrap_or_default()));
    Ok(json(StatusCode::OK, &views.collect::<Vec<_>>()))
}

/// The same sums as the store's, for a job read with its blobs.
fn summarize(blobs: &[BlobProgress]) -> Summary {
    let mut s = Summary { blobs: blobs.len() as u64, ..Summary::default() };
    for b in blobs {
        let want = b.length.saturating_mul(u64::from(b.wanted.max(1)));
        s.bytes = s.bytes.saturating_add(want);
        if b.is_held() {
            s.held += 1;
            s.bytes_held = s.bytes_held.saturating_add(want);
        }
        if !b.error.is_empty() {
            s.failed += 1;
        }
    }
    s
}

pub(super) async fn cluster(api: &Api) -> Result<Response<Full<Bytes>>, ApiError> {
    let job_store = api.store.backend().to_owned();
    let recent = api.store.list(100, 0).await?;
    let mut places: Vec<String> = Vec::new();
    for job in &recent {
        let place = job.runner.split('#').next().unwrap_or("");
        if !place.is_empty() && !places.iter().any(|p| p == place) {
            places.push(place.to_owned());
        }
    }
    let mut schedulers = vec![SchedulerRow {
        address: api.address.clone(),
        job_store: job_store.clone(),
        runs_jobs: places.contains(&api.address),
    }];
    schedulers.extend(places.into_iter().filter(|p| *p != api.address).map(|address| SchedulerRow {
        address,
        job_store: job_store.clone(),
        runs_jobs: true,
    }));
    let (hosts, tasks) = (api.scheduler.hosts_view(), api.scheduler.tasks_view(MAX_TASKS));
    Ok(json(StatusCode::OK, &ClusterView { schedulers, hosts, tasks }))
}
