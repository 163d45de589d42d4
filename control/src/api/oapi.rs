//! Harbor ≥ 2.12's provider protocol, the Dragonfly manager's Open API: `POST /oapi/v1/jobs`
//! creates a preheat job, `GET /oapi/v1/jobs/{id}` polls it. Field names, zero values and
//! states are those Harbor's client sends and parses; it fails a job on any state but
//! `PENDING`, `RUNNING`, `SUCCESS` and `FAILURE`, and needs `id` as a JSON number.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::{Deserialize, Serialize};

use super::{json, page, parse, parse_id, rfc3339, Api, ApiError};
use crate::job::{
    registry_headers, Job, JobSpec, Origin, Scope, Target, DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT, MAX_CONCURRENCY,
    MAX_TIMEOUT,
};

/// The cluster id reported in results: this control plane serves one cluster.
const CLUSTER_ID: u64 = 1;

#[derive(Deserialize)]
struct CreateJob {
    #[serde(rename = "type")]
    kind: String,
    args: PreheatArgs,
    #[serde(default)]
    #[allow(dead_code)] // Read so a request naming clusters parses; there is one cluster.
    scheduler_cluster_ids: Option<Vec<u64>>,
}

#[derive(Deserialize, Serialize, Clone, Default)]
struct PreheatArgs {
    #[serde(rename = "type", default)]
    kind: String,
    url: String,
    #[serde(default)]
    tag: String,
    #[serde(default)]
    filtered_query_params: String,
    #[serde(default, skip_serializing)]
    headers: Option<BTreeMap<String, String>>,
    #[serde(default)]
    scope: String,
    #[serde(default)]
    concurrent_count: i64,
    /// A Go duration: integer nanoseconds.
    #[serde(default)]
    timeout: i64,
    /// `os/arch[/variant]`; the manager's own field, which Harbor leaves out.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    platform: String,
}

pub(super) async fn create(api: &Api, body: Bytes) -> Result<Response<Full<Bytes>>, ApiError> {
    let spec = spec(&body)?;
    let id = api.create(&spec).await?;
    let job = api.store.get(id).await?.ok_or_else(|| ApiError::NoJob(id.to_string()))?;
    Ok(json(StatusCode::OK, &render(&job)))
}

/// The job a request body asks for, checked.
pub(super) fn spec(body: &[u8]) -> Result<JobSpec, ApiError> {
    let req: CreateJob = parse(body)?;
    if req.kind != "preheat" {
        return Err(ApiError::Unprocessable(format!("job type {:?} is not supported; only \"preheat\"", req.kind)));
    }
    spec_from(&req.args, Origin::OpenApi)
}

fn spec_from(args: &PreheatArgs, origin: Origin) -> Result<JobSpec, ApiError> {
    let bad = |m: String| Err(ApiError::Unprocessable(m));
    let target = match args.kind.as_str() {
        "" => Target::Image,
        other => match Target::parse(other) {
            Some(t) => t,
            None => return bad(format!("args.type {other:?} must be \"image\" or \"file\"")),
        },
    };
    if args.url.trim().is_empty() {
        return bad("args.url is required".to_owned());
    }
    let Some(scope) = Scope::parse(&args.scope) else {
        return bad(format!("args.scope {:?} must be single_seed_peer, all_seed_peers or all_peers", args.scope));
    };
    let concurrency = match args.concurrent_count {
        0 => DEFAULT_CONCURRENCY,
        n if n > 0 && n <= i64::from(MAX_CONCURRENCY) => n as u32,
        n => return bad(format!("args.concurrent_count {n} must be between 0 and {MAX_CONCURRENCY}")),
    };
    let timeout = match args.timeout {
        0 => DEFAULT_TIMEOUT,
        n if n > 0 && Duration::from_nanos(n as u64) <= MAX_TIMEOUT => Duration::from_nanos(n as u64),
        n => return bad(format!("args.timeout {n} ns must be positive and at most {} s", MAX_TIMEOUT.as_secs())),
    };
    let platforms = match args.platform.trim() {
        "" => Vec::new(),
        p => vec![p.to_owned()],
    };
    Ok(JobSpec {
        target,
        url: args.url.trim().to_owned(),
        headers: registry_headers(args.headers.clone().unwrap_or_default()),
        scope,
        platforms,
        concurrency,
        timeout,
        origin,
    })
}

pub(super) async fn get(api: &Api, id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let job = api.store.get(parse_id(id)?).await?.ok_or_else(|| ApiError::NoJob(id.to_owned()))?;
    Ok(json(StatusCode::OK, &render(&job)))
}

pub(super) async fn list(api: &Api, query: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let (limit, offset) = page(query);
    let jobs = api.store.list(limit, offset).await?;
    Ok(json(StatusCode::OK, &jobs.iter().map(render).collect::<Vec<_>>()))
}

#[derive(Serialize)]
struct JobReply {
    id: i64,
    created_at: String,
    updated_at: String,
    #[serde(rename = "type")]
    kind: &'static str,
    state: &'static str,
    args: PreheatArgs,
    scheduler_cluster_ids: [u64; 1],
    result: JobResult,
}

#[derive(Serialize)]
struct JobResult {
    job_states: Vec<JobStateReply>,
}

#[derive(Serialize)]
struct JobStateReply {
    error: String,
    results: Vec<ClusterResult>,
}

#[derive(Serialize)]
struct ClusterResult {
    scheduler_cluster_id: u64,
    success_tasks: Vec<TaskReply>,
    failure_tasks: Vec<TaskReply>,
}

#[derive(Serialize)]
struct TaskReply {
    url: String,
    hostname: String,
    ip: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    description: Option<String>,
}

fn render(job: &Job) -> JobReply {
    let task = |host: &str, ip: &str, description: Option<String>| TaskReply {
        url: job.spec.url.clone(),
        hostname: host.to_owned(),
        ip: ip.to_owned(),
        description,
    };
    let success_tasks = job.succeeded_peers().map(|p| task(&p.host_id, &p.ip, None)).collect();
    let failure_tasks = job.failed_peers().map(|p| task(&p.host_id, &p.ip, Some(p.description.clone()))).collect();
    JobReply {
        id: job.id.0,
        created_at: rfc3339(job.created_ms),
        updated_at: rfc3339(job.updated_ms),
        kind: "preheat",
        state: job.state.as_str(),
        args: PreheatArgs {
            kind: job.spec.target.as_str().to_owned(),
            url: job.spec.url.clone(),
            scope: job.spec.scope.as_str().to_owned(),
            concurrent_count: i64::from(job.spec.concurrency),
            timeout: i64::try_from(job.spec.timeout.as_nanos()).unwrap_or(i64::MAX),
            platform: job.spec.platforms.join(","),
            ..PreheatArgs::default()
        },
        scheduler_cluster_ids: [CLUSTER_ID],
        result: JobResult {
            job_states: vec![JobStateReply {
                error: job.error.clone(),
                results: vec![ClusterResult { scheduler_cluster_id: CLUSTER_ID, success_tasks, failure_tasks }],
            }],
        },
    }
}
