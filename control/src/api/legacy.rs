//! Harbor 2.1–2.11's provider protocol, Dragonfly 1.x's `/preheats`: ids are strings, states
//! `WAITING|RUNNING|SUCCESS|FAILED`, and `208 Already Reported` tells Harbor the image is
//! preheated already (it then records success without polling).

use std::collections::BTreeMap;

use bytes::Bytes;
use http::{Response, StatusCode};
use http_body_util::Full;
use serde::{Deserialize, Serialize};

use super::{json, parse, parse_id, rfc3339, Api, ApiError};
use crate::job::{
    registry_headers, Job, JobSpec, JobState, Origin, Scope, Target, DEFAULT_CONCURRENCY, DEFAULT_TIMEOUT,
};

#[derive(Deserialize)]
struct CreatePreheat {
    #[serde(rename = "type", default)]
    kind: String,
    url: String,
    #[serde(default)]
    headers: Option<BTreeMap<String, String>>,
}

#[derive(Serialize)]
struct Created {
    #[serde(rename = "ID")]
    id: String,
}

#[derive(Serialize)]
struct Status {
    #[serde(rename = "ID")]
    id: String,
    status: &'static str,
    #[serde(rename = "startTime")]
    start_time: String,
    #[serde(rename = "finishTime")]
    finish_time: String,
    #[serde(rename = "errorMsg")]
    error_msg: String,
}

/// The job a request body asks for, checked.
pub(super) fn spec(body: &[u8]) -> Result<JobSpec, ApiError> {
    let req: CreatePreheat = parse(body)?;
    let target = match req.kind.as_str() {
        "" | "image" => Target::Image,
        "file" => Target::File,
        other => return Err(ApiError::Unprocessable(format!("type {other:?} must be \"image\" or \"file\""))),
    };
    if req.url.trim().is_empty() {
        return Err(ApiError::Unprocessable("url is required".to_owned()));
    }
    Ok(JobSpec {
        target,
        url: req.url.trim().to_owned(),
        headers: registry_headers(req.headers.unwrap_or_default()),
        scope: Scope::SingleSeedPeer,
        platforms: Vec::new(),
        concurrency: DEFAULT_CONCURRENCY,
        timeout: DEFAULT_TIMEOUT,
        origin: Origin::Legacy,
    })
}

pub(super) async fn create(api: &Api, body: Bytes) -> Result<Response<Full<Bytes>>, ApiError> {
    let spec = spec(&body)?;
    // Harbor asks again for an image it preheated before: a job still under way is that
    // job, and one whose blobs every peer still holds is already done.
    if let Some(previous) = api.store.latest_for(&spec.url, spec.scope).await? {
        let still_held = previous.state == JobState::Success && held_now(api, &previous);
        if still_held {
            return Ok(json(StatusCode::ALREADY_REPORTED, &Created { id: previous.id.to_string() }));
        }
        // Only a job with the same credentials: one without them may fail where this would not.
        if !previous.state.is_done() && previous.spec.headers == spec.headers {
            return Ok(json(StatusCode::OK, &Created { id: previous.id.to_string() }));
        }
    }
    let id = api.create(&spec).await?;
    Ok(json(StatusCode::OK, &Created { id: id.to_string() }))
}

/// Whether the peers that held a finished job's blobs hold them still.
fn held_now(api: &Api, job: &Job) -> bool {
    let peers: Vec<&str> = job.succeeded_peers().map(|p| p.host_id.as_str()).collect();
    !peers.is_empty()
        && job.blobs.iter().all(|b| {
            let holding = api.scheduler.holding(&b.digest, b.length);
            holding.quarantined.is_none()
                && peers.iter().all(|h| holding.peers.iter().any(|(host, _, finished)| *finished && host == h))
        })
}

pub(super) async fn get(api: &Api, id: &str) -> Result<Response<Full<Bytes>>, ApiError> {
    let job = api.store.get(parse_id(id)?).await?.ok_or_else(|| ApiError::NoJob(id.to_owned()))?;
    let status = match job.state {
        JobState::Pending => "WAITING",
        JobState::Running => "RUNNING",
        JobState::Success => "SUCCESS",
        JobState::Failure => "FAILED",
    };
    Ok(json(
        StatusCode::OK,
        &Status {
            id: job.id.to_string(),
            status,
            start_time: rfc3339(job.created_ms),
            finish_time: if job.state.is_done() { rfc3339(job.updated_ms) } else { String::new() },
            error_msg: job.error.clone(),
        },
    ))
}
