//! Docker token authentication in front of an anonymous real registry.
//!
//! - `GET /token?service=..&scope=repository:REPO:pull` (optionally with `Authorization: Basic`)
//!   and `POST /token` (form: `grant_type=password`, `username`, `password`, `scope`, `service`)
//!   issue opaque random tokens with `expires_in`. Wrong credentials get 401. As on real token
//!   servers, an anonymous request for a private scope gets a token *without* that scope.
//! - Repositories under `public/` may be pulled anonymously; everything else (`private/...`)
//!   needs `alice:secret`. Alice may also push.
//! - Every `/v2/` request needs a Bearer token carrying the scope of its repository (`GET /v2/`
//!   needs any valid token); otherwise 401 with
//!   `WWW-Authenticate: Bearer realm="http://HOST/token",service="test-registry",scope="repository:REPO:pull"`.
//! - Authorised requests are proxied to the real registry, bodies streamed.

use std::collections::{HashMap, HashSet};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use base64::Engine;
use bytes::Bytes;
use futures_util::TryStreamExt;
use http_body_util::{combinators::BoxBody, BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use hyper::header::{HeaderName, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::task::JoinSet;

use crate::util::{http_client, random_token};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = BoxBody<Bytes, BoxError>;

pub const SERVICE: &str = "test-registry";
pub const USER: &str = "alice";
pub const PASSWORD: &str = "secret";
pub const PUBLIC_PREFIX: &str = "public/";
const TOKEN_TTL: Duration = Duration::from_secs(300);

/// One request seen by the front, for assertions ("did the client come here directly?").
#[derive(Debug, Clone)]
pub struct FrontRequest {
    pub method: String,
    pub path_and_query: String,
    pub user_agent: String,
    pub status: u16,
}

struct Grant {
    /// (repository, action)
    scopes: HashSet<(String, String)>,
    expires: Instant,
}

struct FrontState {
    realm: String,
    upstream: String,
    tokens: Mutex<HashMap<String, Grant>>,
    log: Mutex<Vec<FrontRequest>>,
    client: reqwest::Client,
}

pub struct TokenAuthFront {
    addr: SocketAddr,
    state: Arc<FrontState>,
    _tasks: JoinSet<()>,
}

impl TokenAuthFront {
    /// Serves on a free loopback port, proxying to `upstream_url` (`http://127.0.0.1:PORT`).
    pub async fn start(upstream_url: &str) -> Result<TokenAuthFront> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let state = Arc::new(FrontState {
            realm: format!("http://{addr}/token"),
            upstream: upstream_url.trim_end_matches('/').to_owned(),
            tokens: Mutex::new(HashMap::new()),
            log: Mutex::new(Vec::new()),
            client: http_client(),
        });
        let mut tasks = JoinSet::new();
        let st = state.clone();
        tasks.spawn(async move {
            let mut conns = JoinSet::new();
            loop {
                tokio::select! {
                    accepted = listener.accept() => {
                        let Ok((stream, _)) = accepted else { continue };
                        let st = st.clone();
                        conns.spawn(async move {
                            let service = hyper::service::service_fn(move |req| handle(st.clone(), req));
                            let _ = hyper::server::conn::http1::Builder::new()
                                .serve_connection(TokioIo::new(stream), service)
                                .await;
                        });
                    }
                    Some(_) = conns.join_next(), if !conns.is_empty() => {}
                }
            }
        });
        Ok(TokenAuthFront { addr, state, _tasks: tasks })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `127.0.0.1:PORT`: the registry host clients and the daemon see.
    pub fn host(&self) -> String {
        self.addr.to_string()
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// `http://127.0.0.1:PORT/token`
    pub fn realm(&self) -> &str {
        &self.state.realm
    }

    /// Requests seen so far.
    pub fn requests(&self) -> Vec<FrontRequest> {
        self.state.log.lock().unwrap().clone()
    }

    /// Client side of the token flow, as a test client would do it: `GET realm?service&scope`
    /// with optional Basic credentials; returns the token.
    pub async fn fetch_token(&self, scope: &str, creds: Option<(&str, &str)>) -> Result<String> {
        let mut req = http_client().get(self.realm()).query(&[("service", SERVICE), ("scope", scope)]);
        if let Some((user, pass)) = creds {
            req = req.basic_auth(user, Some(pass));
        }
        let resp = req.send().await?;
        ensure!(resp.status() == 200, "token endpoint: {}", resp.status());
        let v: serde_json::Value = serde_json::from_slice(&resp.bytes().await?)?;
        Ok(v["token"].as_str().context("token in response")?.to_owned())
    }
}

fn full(body: impl Into<Bytes>) -> Body {
    Full::new(body.into()).map_err(|never| match never {}).boxed()
}

fn json_response(status: StatusCode, body: serde_json::Value) -> Response<Body> {
    let mut resp = Response::new(full(body.to_string()));
    *resp.status_mut() = status;
    resp.headers_mut().insert("content-type", HeaderValue::from_static("application/json"));
    resp
}

async fn handle(state: Arc<FrontState>, req: Request<Incoming>) -> Result<Response<Body>, Infallible> {
    let method = req.method().to_string();
    let path_and_query = req.uri().path_and_query().map(|p| p.to_string()).unwrap_or_default();
    let user_agent = req.headers().get("user-agent").and_then(|v| v.to_str().ok()).unwrap_or_default().to_owned();
    let path = req.uri().path().to_owned();
    let resp = if path == "/token" {
        token_endpoint(&state, req).await
    } else if path == "/v2" || path.starts_with("/v2/") {
        registry_endpoint(&state, req).await
    } else {
        json_response(StatusCode::NOT_FOUND, serde_json::json!({"errors": [{"code": "NOT_FOUND"}]}))
    };
    state.log.lock().unwrap().push(FrontRequest { method, path_and_query, user_agent, status: resp.status().as_u16() });
    Ok(resp)
}

/// Which actions `user` (None = anonymous) may have on `repo`.
fn allowed_actions(repo: &str, user: Option<&str>) -> &'static [&'static str] {
    match user {
        Some(USER) => &["pull", "push"],
        _ if repo.starts_with(PUBLIC_PREFIX) => &["pull"],
        _ => &[],
    }
}

fn parse_query(query: &str) -> Vec<(String, String)> {
    url_decode_pairs(query)
}

fn url_decode_pairs(s: &str) -> Vec<(String, String)> {
    s.split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3]).ok();
                match hex.and_then(|h| u8::from_str_radix(h, 16).ok()) {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `Basic base64(user:pass)` → Some(Ok(user)) if right, Some(Err) if wrong, None if absent.
fn basic_user(header: Option<&str>) -> Option<Result<String, ()>> {
    let value = header?;
    let encoded = value.strip_prefix("Basic ").or_else(|| value.strip_prefix("basic "))?;
    let decoded = base64::engine::general_purpose::STANDARD.decode(encoded.trim()).ok();
    let decoded = decoded.and_then(|d| String::from_utf8(d).ok());
    Some(match decoded.as_deref().and_then(|d| d.split_once(':')) {
        Some((u, p)) if u == USER && p == PASSWORD => Ok(u.to_owned()),
        _ => Err(()),
    })
}

async fn token_endpoint(state: &FrontState, req: Request<Incoming>) -> Response<Body> {
    let unauthorized = || {
        let mut r = json_response(
            StatusCode::UNAUTHORIZED,
            serde_json::json!({"errors": [{"code": "UNAUTHORIZED", "message": "incorrect username or password"}]}),
        );
        r.headers_mut().insert("www-authenticate", HeaderValue::from_static("Basic realm=\"test-registry\""));
        r
    };
    let auth = req.headers().get("authorization").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let mut user = match basic_user(auth.as_deref()) {
        Some(Ok(u)) => Some(u),
        Some(Err(())) => return unauthorized(),
        None => None,
    };
    let mut scopes: Vec<String> = Vec::new();
    let query = req.uri().query().unwrap_or_default().to_owned();
    for (k, v) in parse_query(&query) {
        if k == "scope" {
            scopes.extend(v.split(' ').map(str::to_owned));
        }
    }
    if req.method() == Method::POST {
        // OAuth2 password grant, as containerd and nydusd send it.
        let body = match req.into_body().collect().await {
            Ok(b) => b.to_bytes(),
            Err(_) => return json_response(StatusCode::BAD_REQUEST, serde_json::json!({"error": "body"})),
        };
        let form = url_decode_pairs(&String::from_utf8_lossy(&body));
        let get = |name: &str| form.iter().find(|(k, _)| k == name).map(|(_, v)| v.clone());
        match get("grant_type").as_deref() {
            Some("password") => {
                if get("username").as_deref() != Some(USER) || get("password").as_deref() != Some(PASSWORD) {
                    return unauthorized();
                }
                user = Some(USER.to_owned());
            }
            _ => return json_response(StatusCode::BAD_REQUEST, serde_json::json!({"error": "unsupported_grant_type"})),
        }
        for (k, v) in &form {
            if k == "scope" {
                scopes.extend(v.split(' ').map(str::to_owned));
            }
        }
    } else if req.method() != Method::GET {
        return json_response(StatusCode::METHOD_NOT_ALLOWED, serde_json::json!({"error": "method"}));
    }

    // Grant the subset of requested scopes this user may have (possibly none).
    let mut granted = HashSet::new();
    for scope in scopes.iter().filter(|s| !s.is_empty()) {
        let mut parts = scope.splitn(3, ':');
        let (Some("repository"), Some(repo), Some(actions)) = (parts.next(), parts.next(), parts.next()) else {
            continue;
        };
        let allowed = allowed_actions(repo, user.as_deref());
        for action in actions.split(',') {
            if allowed.contains(&action) {
                granted.insert((repo.to_owned(), action.to_owned()));
            }
        }
    }
    let token = random_token();
    state.tokens.lock().unwrap().insert(token.clone(), Grant { scopes: granted, expires: Instant::now() + TOKEN_TTL });
    json_response(
        StatusCode::OK,
        serde_json::json!({"token": token, "access_token": token, "expires_in": TOKEN_TTL.as_secs()}),
    )
}

/// `/v2/<name>/(manifests|blobs|tags)/...` → `<name>`; `None` for `/v2/` itself and oddities.
fn repository_of(path: &str) -> Option<&str> {
    let rest = path.strip_prefix("/v2/")?;
    ["/manifests/", "/blobs/", "/tags/"].iter().filter_map(|m| rest.find(m)).min().map(|i| &rest[..i])
}

async fn registry_endpoint(state: &FrontState, req: Request<Incoming>) -> Response<Body> {
    let path = req.uri().path().to_owned();
    let bearer = req
        .headers()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(|t| t.trim().to_owned());
    let grant_scopes = bearer.as_ref().and_then(|t| {
        let tokens = state.tokens.lock().unwrap();
        tokens.get(t).filter(|g| g.expires > Instant::now()).map(|g| g.scopes.clone())
    });
    let repo = repository_of(&path).map(str::to_owned);
    let action = if req.method() == Method::GET || req.method() == Method::HEAD { "pull" } else { "push" };

    let authorized = match (&repo, &grant_scopes) {
        (_, None) => false,
        (None, Some(_)) => path == "/v2/" || path == "/v2",
        (Some(repo), Some(scopes)) => scopes.contains(&(repo.clone(), action.to_owned())),
    };
    if !authorized {
        let mut challenge = format!("Bearer realm=\"{}\",service=\"{SERVICE}\"", state.realm);
        if let Some(repo) = &repo {
            challenge.push_str(&format!(",scope=\"repository:{repo}:{action}\""));
            if grant_scopes.is_some() {
                challenge.push_str(",error=\"insufficient_scope\"");
            }
        }
        let body = serde_json::json!({"errors": [{
            "code": "UNAUTHORIZED",
            "message": "authentication required",
            "detail": repo.as_ref().map(|r| serde_json::json!([{"Type": "repository", "Name": r, "Action": action}])),
        }]});
        let mut resp = if req.method() == Method::HEAD {
            let mut r = Response::new(full(Bytes::new()));
            *r.status_mut() = StatusCode::UNAUTHORIZED;
            r
        } else {
            json_response(StatusCode::UNAUTHORIZED, body)
        };
        resp.headers_mut().insert("www-authenticate", HeaderValue::from_str(&challenge).expect("ascii challenge"));
        resp.headers_mut().insert("docker-distribution-api-version", HeaderValue::from_static("registry/2.0"));
        return resp;
    }
    match proxy(state, req).await {
        Ok(resp) => resp,
        Err(e) => json_response(
            StatusCode::BAD_GATEWAY,
            serde_json::json!({"errors": [{"code": "UNKNOWN", "message": e.to_string()}]}),
        ),
    }
}

const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "transfer-encoding",
    "upgrade",
    "te",
    "trailer",
    "host",
    "authorization",
];

async fn proxy(state: &FrontState, req: Request<Incoming>) -> Result<Response<Body>> {
    let (parts, body) = req.into_parts();
    let url = format!("{}{}", state.upstream, parts.uri.path_and_query().map(|p| p.as_str()).unwrap_or("/"));
    let method = reqwest::Method::from_bytes(parts.method.as_str().as_bytes())?;
    let mut upstream = state.client.request(method, url);
    for (name, value) in &parts.headers {
        if !HOP_BY_HOP.contains(&name.as_str()) && name.as_str() != "content-length" {
            upstream = upstream.header(name.as_str(), value.as_bytes());
        }
    }
    let body = body.collect().await?.to_bytes();
    if !body.is_empty() {
        upstream = upstream.body(body);
    }
    let resp = upstream.send().await?;
    let mut out = Response::builder().status(resp.status().as_u16());
    for (name, value) in resp.headers() {
        if !HOP_BY_HOP.contains(&name.as_str()) {
            out = out
                .header(HeaderName::from_bytes(name.as_str().as_bytes())?, HeaderValue::from_bytes(value.as_bytes())?);
        }
    }
    let stream = resp.bytes_stream().map_ok(Frame::data).map_err(|e| Box::new(e) as BoxError);
    Ok(out.body(BodyExt::boxed(StreamBody::new(stream)))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repository_names() {
        assert_eq!(repository_of("/v2/private/app/blobs/sha256:ab"), Some("private/app"));
        assert_eq!(repository_of("/v2/a/b/c/manifests/v1"), Some("a/b/c"));
        assert_eq!(repository_of("/v2/x/blobs/uploads/"), Some("x"));
        assert_eq!(repository_of("/v2/"), None);
    }

    #[test]
    fn decodes_scope_query() {
        let q = parse_query("service=test-registry&scope=repository%3Aprivate%2Fapp%3Apull&x");
        assert_eq!(q[1], ("scope".to_owned(), "repository:private/app:pull".to_owned()));
        assert_eq!(percent_decode("a%zz%4"), "a%zz%4");
    }

    #[test]
    fn public_is_anonymous_private_needs_alice() {
        assert_eq!(allowed_actions("public/app", None), &["pull"]);
        assert!(allowed_actions("private/app", None).is_empty());
        assert_eq!(allowed_actions("private/app", Some(USER)), &["pull", "push"]);
    }
}
