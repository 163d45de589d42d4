//! The control plane's HTTP face on the scheduler's HTTP port: the scheduler's own `/healthy`
//! and `/metrics`, Harbor's two preheat protocols (`oapi.rs`, `legacy.rs`), registry push
//! notifications (`notify.rs`), and the JSON API the CLI and the console read (`v1.rs`).
//! Errors become responses in one place (`ApiError::into_response`).

mod console;
mod legacy;
mod notify;
mod oapi;
pub mod v1;

use std::sync::Arc;

use bytes::Bytes;
use http::header::{CONTENT_LENGTH, CONTENT_TYPE};
use http::{HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use serde::Serialize;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::auth::Credentials;
use crate::job::{JobId, JobSpec, Scope};
use crate::resolve::check_url;
use crate::store::{JobStore, StoreError};
use damselfly_scheduler::Scheduler;

/// Request bodies larger than this are refused.
const MAX_BODY: usize = 1 << 20;
/// Jobs waiting or running, over all schedulers of the store, beyond which new ones are
/// refused (429).
pub const MAX_OPEN_JOBS: u64 = 1000;

/// What every handler shares.
pub struct Api {
    pub store: JobStore,
    pub scheduler: Scheduler,
    pub credentials: Credentials,
    /// The scope of jobs a registry's push notification starts.
    pub notification_scope: Scope,
    /// This scheduler's HTTP address, as its runner names itself in job claims.
    pub address: String,
}

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("not found")]
    NotFound,
    #[error("no such job: {0}")]
    NoJob(String),
    #[error("method not allowed")]
    Method,
    /// `basic`: the credential is HTTP Basic, which a browser asks for itself when told to.
    #[error("unauthorized")]
    Unauthorized { basic: bool },
    #[error("{0}")]
    Unprocessable(String),
    #[error("request body larger than {MAX_BODY} bytes")]
    TooLarge,
    #[error("request bodies must be JSON (Content-Type: application/json)")]
    NotJson,
    #[error("{MAX_OPEN_JOBS} jobs are waiting or running; try again later")]
    Busy,
    #[error("reading the request body: {0}")]
    Body(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    /// The one place an error becomes a response: `{"errors": "…"}`, the shape Dragonfly's
    /// manager answers and Harbor logs.
    fn into_response(self) -> Response<Full<Bytes>> {
        let status = match &self {
            ApiError::NotFound | ApiError::NoJob(_) => StatusCode::NOT_FOUND,
            ApiError::Method => StatusCode::METHOD_NOT_ALLOWED,
            ApiError::Unauthorized { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Unprocessable(_) => StatusCode::UNPROCESSABLE_ENTITY,
            ApiError::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::NotJson => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ApiError::Busy => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Body(_) => StatusCode::BAD_REQUEST,
            ApiError::Store(e) => {
                tracing::warn!(error = %e, "job store failed a request");
                StatusCode::SERVICE_UNAVAILABLE
            }
        };
        let mut resp = json(status, &serde_json::json!({ "errors": self.to_string() }));
        if let ApiError::Unauthorized { basic } = self {
            let challenge = match basic {
                true => "Basic realm=\"damselfly\"",
                false => "Bearer realm=\"damselfly\"",
            };
            resp.headers_mut().insert(http::header::WWW_AUTHENTICATE, HeaderValue::from_static(challenge));
        }
        resp
    }
}

/// Serves the API on `listener` until `shutdown`.
pub async fn serve(listener: TcpListener, api: Arc<Api>, shutdown: CancellationToken) {
    let handler = move |req: Request<Incoming>| {
        let api = api.clone();
        async move { api.handle(req).await }
    };
    damselfly_serve::serve(listener, handler, shutdown).await;
}

impl Api {
    pub async fn handle(&self, req: Request<Incoming>) -> Response<Full<Bytes>> {
        match self.route(req).await {
            Ok(resp) => resp,
            Err(e) => e.into_response(),
        }
    }

    async fn route(&self, req: Request<Incoming>) -> Result<Response<Full<Bytes>>, ApiError> {
        let path = req.uri().path().to_owned();
        let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
        let method = req.method().clone();
        // Health and metrics stay open: load balancers and Prometheus ask them.
        match (&method, segments.as_slice()) {
            (&Method::GET, ["healthy"] | ["metrics"]) => {
                return Ok(damselfly_scheduler::http_route(&path, self.scheduler.metrics()))
            }
            (&Method::GET, ["_ping"] | ["health"]) => return Ok(damselfly_serve::text(StatusCode::OK, "OK")),
            (&Method::GET, ["console.js"] | ["console.css"]) => {
                return console::static_asset(&path).ok_or(ApiError::NotFound)
            }
            _ => {}
        }
        if !self.credentials.admits(req.headers(), req.uri().query()) {
            return Err(ApiError::Unauthorized { basic: self.credentials.basic.is_some() });
        }
        let query = req.uri().query().unwrap_or("").to_owned();
        match (method, segments.as_slice()) {
            (Method::POST, ["oapi", "v1", "jobs"]) => oapi::create(self, body(req).await?).await,
            (Method::GET, ["oapi", "v1", "jobs"]) => oapi::list(self, &query).await,
            (Method::GET, ["oapi", "v1", "jobs", id]) => oapi::get(self, id).await,
            (Method::POST, ["preheats"]) => legacy::create(self, body(req).await?).await,
            (Method::GET, ["preheats", id]) => legacy::get(self, id).await,
            (Method::POST, ["registry", "notifications"]) => notify::receive(self, body(req).await?).await,
            (Method::GET, ["api", "v1", "jobs"]) => v1::list(self, &query).await,
            (Method::POST, ["api", "v1", "jobs"]) => v1::create(self, body(req).await?).await,
            (Method::GET, ["api", "v1", "jobs", id]) => v1::get(self, id).await,
            (Method::GET, ["api", "v1", "cluster"]) => v1::cluster(self).await,
            (Method::GET, [""] | ["console"]) => Ok(console::page()),
            (_, ["oapi", "v1", "jobs", ..] | ["preheats", ..] | ["registry", "notifications"] | ["api", "v1", ..]) => {
                Err(ApiError::Method)
            }
            _ => Err(ApiError::NotFound),
        }
    }

    /// Records a job: its URL must read as one (a registry the rules refuse fails the job
    /// later, with the reason), and the store must not be full of open jobs.
    pub(crate) async fn create(&self, spec: &JobSpec) -> Result<JobId, ApiError> {
        check_url(&spec.url, spec.target).map_err(|e| ApiError::Unprocessable(e.to_string()))?;
        if self.store.open_count().await? >= MAX_OPEN_JOBS {
            return Err(ApiError::Busy);
        }
        let id = self.store.create(spec).await?;
        tracing::info!(job = %id, url = %spec.url, scope = spec.scope.as_str(), origin = spec.origin.as_str(), "preheat job created");
        Ok(id)
    }
}

/// The endpoints that take a job request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Endpoint {
    /// `POST /oapi/v1/jobs`
    OpenApi,
    /// `POST /preheats`
    Legacy,
    /// `POST /api/v1/jobs`
    Api,
    /// `POST /registry/notifications`
    Notification,
}

/// The jobs a request body to `endpoint` asks for, checked as the handlers check them (for
/// the fuzz target; the handlers call the same functions).
pub fn read_request(endpoint: Endpoint, body: &[u8]) -> Result<Vec<JobSpec>, ApiError> {
    match endpoint {
        Endpoint::OpenApi => oapi::spec(body).map(|s| vec![s]),
        Endpoint::Legacy => legacy::spec(body).map(|s| vec![s]),
        Endpoint::Api => v1::spec(body).map(|s| vec![s]),
        Endpoint::Notification => notify::specs(body, Scope::SingleSeedPeer),
    }
}

/// A POST's body, which must be JSON: a cross-site form cannot send that type, so a browser
/// holding Basic credentials for the console cannot be made to start jobs by another page.
async fn body(req: Request<Incoming>) -> Result<Bytes, ApiError> {
    let json_type = req.headers().get(CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|t| {
        let essence = t.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
        essence == "application/json" || (essence.starts_with("application/") && essence.ends_with("+json"))
    });
    if !json_type {
        return Err(ApiError::NotJson);
    }
    let declared = req.headers().get(CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<usize>().ok());
    if declared.is_some_and(|n| n > MAX_BODY) {
        return Err(ApiError::TooLarge);
    }
    match Limited::new(req.into_body(), MAX_BODY).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.downcast_ref::<http_body_util::LengthLimitError>().is_some() => Err(ApiError::TooLarge),
        Err(e) => Err(ApiError::Body(e.to_string())),
    }
}

/// Reads a JSON body; a body that does not fit is 422 with serde's message, as Harbor's
/// providers expect of a bind error.
pub(crate) fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| ApiError::Unprocessable(format!("malformed request body: {e}")))
}

pub(crate) fn parse_id(id: &str) -> Result<JobId, ApiError> {
    match id.parse::<i64>() {
        Ok(n) if n > 0 => Ok(JobId(n)),
        _ => Err(ApiError::NoJob(id.chars().take(64).collect())),
    }
}

pub(crate) fn json<T: Serialize + ?Sized>(status: StatusCode, value: &T) -> Response<Full<Bytes>> {
    let body = serde_json::to_vec(value).unwrap_or_else(|_| b"{}".to_vec());
    let mut resp = Response::new(Full::new(Bytes::from(body)));
    *resp.status_mut() = status;
    resp.headers_mut().insert(CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    resp
}

/// Unix milliseconds as RFC 3339 (UTC, whole seconds), as Harbor parses times.
pub(crate) fn rfc3339(ms: i64) -> String {
    let at = time::OffsetDateTime::from_unix_timestamp(ms.div_euclid(1000)).unwrap_or(time::OffsetDateTime::UNIX_EPOCH);
    at.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// `limit` and `offset` from a query string, bounded.
pub(crate) fn page(query: &str) -> (u32, u32) {
    let mut limit = 50;
    let mut offset = 0;
    for (k, v) in url::form_urlencoded::parse(query.as_bytes()) {
        match k.as_ref() {
            "limit" | "per_page" => limit = v.parse().unwrap_or(limit).clamp(1, 500),
            "offset" => offset = v.parse().unwrap_or(0),
            _ => {}
        }
    }
    (limit, offset)
}

#[cfg(test)]
mod tests;
