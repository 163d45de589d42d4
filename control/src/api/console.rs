//! The console: one page, its script and its style, built into the binary (no build step, no
//! external assets). It reads the JSON API (`v1.rs`) like the CLI. The page asks for the API's
//! credential (a token may come as `?access_token=`); the script and style hold no data.

use bytes::Bytes;
use http::header::{CACHE_CONTROL, CONTENT_TYPE, X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS};
use http::{HeaderValue, Response, StatusCode};
use http_body_util::Full;

const PAGE: &str = include_str!("../console/index.html");
const SCRIPT: &str = include_str!("../console/console.js");
const STYLE: &str = include_str!("../console/console.css");

/// Only the console's own script, style and API: nothing injected into a value it shows can
/// load or run anything else.
const POLICY: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self'; \
     form-action 'self'; base-uri 'none'; frame-ancestors 'none'";

pub(super) fn page() -> Response<Full<Bytes>> {
    asset(PAGE, "text/html; charset=utf-8")
}

/// The script or style at `path`, if it is one.
pub(super) fn static_asset(path: &str) -> Option<Response<Full<Bytes>>> {
    match path {
        "/console.js" => Some(asset(SCRIPT, "text/javascript; charset=utf-8")),
        "/console.css" => Some(asset(STYLE, "text/css; charset=utf-8")),
        _ => None,
    }
}

fn asset(body: &'static str, content_type: &'static str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
    *resp.status_mut() = StatusCode::OK;
    let headers = resp.headers_mut();
    headers.insert(CONTENT_TYPE, HeaderValue::from_static(content_type));
    headers.insert(http::header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(POLICY));
    headers.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    headers.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}
