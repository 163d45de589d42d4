//! End-to-end tests of `Upstream::send` against a tiny in-process registry + token realm.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use bytes::Bytes;
use http::{header, HeaderMap, HeaderValue, Method, Request, Response, StatusCode};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;

use super::*;

const USER_PASS_B64: &str = "dXNlcjpwYXNz"; // user:pass

/// (path and query, Authorization, Accept values) of one request.
type Seen = (String, Option<String>, Vec<String>);

#[derive(Default)]
struct State {
    addr: OnceLock<SocketAddr>,
    /// Another server, so a redirect there is cross-host.
    other: OnceLock<SocketAddr>,
    token_calls: AtomicUsize,
    tls_probes: AtomicUsize,
    unauthorized: AtomicUsize,
    seen: Mutex<Vec<Seen>>,
    /// `/v2/` challenges (the quiet registry's routes).
    quiet: std::sync::atomic::AtomicBool,
}

impl State {
    fn seen(&self, path_prefix: &str) -> Vec<Seen> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|s| s.0.starts_with(path_prefix)).cloned().collect()
    }
}

fn reply(status: StatusCode, headers: &[(header::HeaderName, String)], body: &str) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_owned())));
    *resp.status_mut() = status;
    for (k, v) in headers {
        resp.headers_mut().append(k, HeaderValue::from_str(v).unwrap());
    }
    resp
}

fn route(state: &State, req: Request<Incoming>) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_owned();
    let auth = req.headers().get(header::AUTHORIZATION).map(|v| v.to_str().unwrap().to_owned());
    let accepts = req.headers().get_all(header::ACCEPT).iter().map(|v| v.to_str().unwrap().to_owned()).collect();
    let full = req.uri().path_and_query().unwrap().to_string();
    state.seen.lock().unwrap().push((full, auth.clone(), accepts));
    let addr = state.addr.get().unwrap();
    let bearer = format!(r#"Bearer realm="http://{addr}/token",service="test""#);
    let denied = |challenge: String| {
        state.unauthorized.fetch_add(1, Ordering::SeqCst);
        reply(StatusCode::UNAUTHORIZED, &[(header::WWW_AUTHENTICATE, challenge)], "")
    };
    let auth = auth.as_deref();
    match path.as_str() {
        "/token" => {
            state.token_calls.fetch_add(1, Ordering::SeqCst);
            let token = match auth {
                None => "tok-anon".to_owned(),
                Some(a) if a == format!("Basic {USER_PASS_B64}") => "tok-user".to_owned(),
                Some(_) => return reply(StatusCode::UNAUTHORIZED, &[], ""),
            };
            reply(StatusCode::OK, &[], &format!(r#"{{"token":"{token}","expires_in":300}}"#))
        }
        "/landing" => reply(StatusCode::OK, &[], "landed"),
        "/v2/public/app/manifests/latest" => match auth {
            Some("Bearer tok-anon" | "Bearer tok-user") => reply(StatusCode::OK, &[], "manifest"),
            _ => denied(bearer),
        },
        "/v2/private/app/manifests/latest" => match auth {
            Some("Bearer tok-user") => reply(StatusCode::OK, &[], "secret"),
            Some(_) => denied(format!(r#"{bearer},error="insufficient_scope""#)),
            None => denied(bearer),
        },
        // A registry that challenges only at `/v2/`, and answers a bare 401 elsewhere.
        "/v2/" if state.quiet.load(Ordering::SeqCst) => match auth {
            Some(a) if a == format!("Basic {USER_PASS_B64}") => reply(StatusCode::OK, &[], ""),
            _ => denied(r#"Basic realm="quiet""#.to_owned()),
        },
        "/v2/quiet/app/manifests/latest" => match auth {
            Some(a) if a == format!("Basic {USER_PASS_B64}") => reply(StatusCode::OK, &[], "quiet"),
            _ => {
                state.unauthorized.fetch_add(1, Ordering::SeqCst);
                reply(StatusCode::UNAUTHORIZED, &[], "")
            }
        },
        "/v2/basic/app/manifests/latest" => match auth {
            Some(a) if a == format!("Basic {USER_PASS_B64}") => reply(StatusCode::OK, &[], "basic"),
            _ => denied(r#"Basic realm="test""#.to_owned()),
        },
        "/v2/redir/app/blobs/sha256:cross" => {
            let other = state.other.get().unwrap();
            reply(StatusCode::TEMPORARY_REDIRECT, &[(header::LOCATION, format!("http://{other}/landing"))], "")
        }
        "/v2/redir/app/blobs/sha256:metadata" => reply(
            StatusCode::TEMPORARY_REDIRECT,
            &[(header::LOCATION, "http://169.254.169.254/latest/meta-data/".to_owned())],
            "",
        ),
        "/v2/metadata/app/manifests/latest" => denied(r#"Bearer realm="http://169.254.169.254/token""#.to_owned()),
        "/v2/redir/app/blobs/sha256:same" => {
            reply(StatusCode::TEMPORARY_REDIRECT, &[(header::LOCATION, "/landing".to_owned())], "")
        }
        _ => reply(StatusCode::NOT_FOUND, &[], ""),
    }
}

async fn serve(state: Arc<State>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (stream, _) = listener.accept().await.unwrap();
            let state = state.clone();
            tokio::spawn(async move {
                // A TLS ClientHello starts with 0x16: count it and hang up, as a plain-HTTP
                // registry would fail the handshake.
                let mut first = [0u8; 1];
                if matches!(stream.peek(&mut first).await, Ok(1)) && first[0] == 0x16 {
                    state.tls_probes.fetch_add(1, Ordering::SeqCst);
                    return;
                }
                let svc = service_fn(move |req| {
                    let state = state.clone();
                    async move { Ok::<_, Infallible>(route(&state, req)) }
                });
                let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
            });
        }
    });
    addr
}

async fn setup(credentials: Vec<RegistryCredential>) -> (Upstream, Arc<State>, SocketAddr) {
    let state = Arc::new(State::default());
    let addr = serve(state.clone()).await;
    let other = serve(state.clone()).await;
    state.addr.set(addr).unwrap();
    state.other.set(other).unwrap();
    let credentials = credentials.into_iter().map(|c| RegistryCredential { host: addr.to_string(), ..c }).collect();
    let upstream = Upstream::new(UpstreamConfig { credentials, ..UpstreamConfig::default() }).unwrap();
    (upstream, state, addr)
}

fn user(password: &str) -> RegistryCredential {
    RegistryCredential { host: String::new(), username: "user".into(), password: password.into() }
}

fn request(registry: &RegistryEndpoint, repo: &str, path: &str) -> UpstreamRequest {
    UpstreamRequest {
        registry: registry.clone(),
        repo: repo.into(),
        method: Method::GET,
        path: path.into(),
        headers: HeaderMap::new(),
        client_auth: None,
        anonymous: false,
    }
}

fn http_endpoint(up: &Upstream, addr: SocketAddr) -> RegistryEndpoint {
    let ep = up.select(Some(&format!("http://{addr}/ignored/path")), Some("ghcr.io")).unwrap();
    assert_eq!(ep, RegistryEndpoint { host: addr.to_string(), scheme: SchemePolicy::Http });
    ep
}

#[tokio::test]
async fn anonymous_token_is_fetched_cached_and_pre_attached() {
    let (up, state, addr) = setup(vec![]).await;
    let ep = http_endpoint(&up, addr);
    for _ in 0..2 {
        let reply = up.send(request(&ep, "public/app", "manifests/latest")).await.unwrap();
        assert_eq!(reply.response.status(), StatusCode::OK);
        assert_eq!(reply.credential, CredentialKind::Anonymous);
        assert_eq!(reply.response.text().await.unwrap(), "manifest");
    }
    assert_eq!(state.token_calls.load(Ordering::SeqCst), 1);
    // Only the very first request paid a 401: the second pre-attached the cached token.
    assert_eq!(state.unauthorized.load(Ordering::SeqCst), 1);
    let token_reqs = state.seen("/token");
    assert_eq!(token_reqs[0].0, "/token?service=test&scope=repository%3Apublic%2Fapp%3Apull");
    assert_eq!(token_reqs[0].1, None);
}

#[tokio::test]
async fn private_repo_401_is_returned_after_anonymous_token() {
    let (up, state, addr) = setup(vec![]).await;
    let ep = http_endpoint(&up, addr);
    for _ in 0..2 {
        let reply = up.send(request(&ep, "private/app", "manifests/latest")).await.unwrap();
        assert_eq!(reply.response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(reply.credential, CredentialKind::Anonymous);
        let challenge = reply.response.headers()[header::WWW_AUTHENTICATE].to_str().unwrap().to_owned();
        assert!(challenge.contains("insufficient_scope"), "{challenge}");
    }
    // The second request reuses the cached anonymous token and stops at insufficient_scope.
    assert_eq!(state.token_calls.load(Ordering::SeqCst), 1);
    assert_eq!(state.unauthorized.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn configured_credentials_go_to_the_realm() {
    let (up, state, addr) = setup(vec![user("pass")]).await;
    let ep = http_endpoint(&up, addr);
    let reply = up.send(request(&ep, "private/app", "manifests/latest")).await.unwrap();
    assert_eq!(reply.response.status(), StatusCode::OK);
    assert_eq!(reply.credential, CredentialKind::Configured);
    let token_reqs = state.seen("/token");
    assert_eq!(token_reqs.len(), 1);
    assert_eq!(token_reqs[0].1.as_deref(), Some(format!("Basic {USER_PASS_B64}").as_str()));
}

#[tokio::test]
async fn refused_configured_credentials_relay_the_401() {
    let (up, _state, addr) = setup(vec![user("wrong")]).await;
    let ep = http_endpoint(&up, addr);
    let reply = up.send(request(&ep, "private/app", "manifests/latest")).await.unwrap();
    assert_eq!(reply.response.status(), StatusCode::UNAUTHORIZED);
    assert!(reply.response.headers().contains_key(header::WWW_AUTHENTICATE));
}

#[tokio::test]
async fn basic_challenge() {
    let (up, state, addr) = setup(vec![user("pass")]).await;
    let ep = http_endpoint(&up, addr);
    let reply = up.send(request(&ep, "basic/app", "manifests/latest")).await.unwrap();
    assert_eq!(reply.response.status(), StatusCode::OK);
    assert_eq!(reply.credential, CredentialKind::Configured);
    assert_eq!(state.token_calls.load(Ordering::SeqCst), 0);

    let (anon, _, addr) = setup(vec![]).await;
    let ep = http_endpoint(&anon, addr);
    let reply = anon.send(request(&ep, "basic/app", "manifests/latest")).await.unwrap();
    assert_eq!(reply.response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(reply.credential, CredentialKind::Anonymous);
}

#[tokio::test]
async fn client_auth_is_forwarded_with_all_accept_values() {
    let (up, state, addr) = setup(vec![user("pass")]).await;
    let ep = http_endpoint(&up, addr);
    let mut req = request(&ep, "private/app", "manifests/latest");
    req.client_auth = Some(HeaderValue::from_static("Bearer client-tok"));
    req.headers.append(header::ACCEPT, HeaderValue::from_static("application/vnd.oci.image.index.v1+json"));
    req.headers.append(header::ACCEPT, HeaderValue::from_static("application/vnd.oci.image.manifest.v1+json"));
    let reply = up.send(req).await.unwrap();
    // The client's own token is refused upstream; the 401 is returned, not replaced by ours.
    assert_eq!(reply.response.status(), StatusCode::UNAUTHORIZED);
    assert_eq!(reply.credential, CredentialKind::Client);
    assert_eq!(state.token_calls.load(Ordering::SeqCst), 0);
    let seen = state.seen("/v2/private");
    assert_eq!(seen.len(), 1);
    assert_eq!(seen[0].1.as_deref(), Some("Bearer client-tok"));
    assert_eq!(seen[0].2.len(), 2);
}

#[tokio::test]
async fn authorization_is_dropped_on_cross_host_redirect_only() {
    let (up, state, addr) = setup(vec![]).await;
    let ep = http_endpoint(&up, addr);
    for (digest, expect) in [("sha256:cross", None), ("sha256:same", Some("Bearer c"))] {
        let mut req = request(&ep, "redir/app", &format!("blobs/{digest}"));
        req.client_auth = Some(HeaderValue::from_static("Bearer c"));
        let reply = up.send(req).await.unwrap();
        assert_eq!(reply.response.text().await.unwrap(), "landed");
        let landing = state.seen("/landing");
        assert_eq!(landing.last().unwrap().1.as_deref(), expect, "{digest}");
    }
}

#[tokio::test]
async fn insecure_registry_falls_back_to_http_and_remembers() {
    let (up, state, addr) = setup(vec![]).await;
    let ep = up.select(None, Some(&addr.to_string())).unwrap();
    assert_eq!(ep.scheme, SchemePolicy::InsecureHttpsThenHttp);
    for _ in 0..3 {
        let reply = up.send(request(&ep, "public/app", "manifests/latest")).await.unwrap();
        assert_eq!(reply.response.status(), StatusCode::OK);
    }
    assert!(up.transport.uses_plain_http(&ep.host));
    // Only the first request tried TLS.
    assert_eq!(state.tls_probes.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn https_registry_does_not_fall_back() {
    let (up, state, addr) = setup(vec![]).await;
    let ep = RegistryEndpoint { host: addr.to_string(), scheme: SchemePolicy::Https };
    let err = up.send(request(&ep, "public/app", "manifests/latest")).await.err().unwrap();
    assert!(err.is_retryable(), "{err}");
    assert_eq!(state.tls_probes.load(Ordering::SeqCst), 1);
    assert!(state.seen("/").is_empty());
}

#[test]
fn selection_order_and_errors() {
    let up = Upstream::new(UpstreamConfig {
        insecure_registries: vec!["reg.local:5000".into()],
        ..UpstreamConfig::default()
    })
    .unwrap();
    let hub = RegistryEndpoint { host: DOCKER_HUB_HOST.into(), scheme: SchemePolicy::Https };
    assert_eq!(up.select(None, None).unwrap(), hub);
    assert_eq!(up.select(None, Some("docker.io")).unwrap(), hub);
    assert_eq!(up.select(Some("https://docker.io"), Some("ghcr.io")).unwrap(), hub);
    assert_eq!(up.select(None, Some("reg.local:5000")).unwrap().scheme, SchemePolicy::InsecureHttpsThenHttp);
    assert_eq!(up.select(Some("https://reg.local:5000"), None).unwrap().scheme, SchemePolicy::InsecureHttpsThenHttp);
    assert!(matches!(up.select(Some("reg.local"), None), Err(UpstreamError::BadRegistry(_))));
    assert!(matches!(up.select(None, Some("bad/host")), Err(UpstreamError::BadRegistry(_))));
    assert!(!UpstreamError::BadRegistry(RegistryNameError::NoHost(String::new())).is_retryable());
}

#[test]
fn a_registry_named_over_plain_http_is_another_registry_than_over_tls() {
    let up = Upstream::new(UpstreamConfig {
        insecure_registries: vec!["reg.local:5000".into()],
        ..UpstreamConfig::default()
    })
    .unwrap();
    let id = |header: Option<&str>, ns: Option<&str>| up.select(header, ns).unwrap().id().to_string();
    assert_eq!(id(Some("https://r.example"), None), "r.example");
    assert_eq!(id(None, Some("r.example")), "r.example");
    assert_eq!(id(Some("http://r.example"), None), "http://r.example");
    // The operator's insecure registries and Docker Hub's spellings keep one name.
    assert_eq!(id(None, Some("reg.local:5000")), id(Some("https://reg.local:5000"), None));
    assert_eq!(id(Some("http://docker.io"), None), DOCKER_HUB_HOST);
}

#[test]
fn upstream_is_shareable_across_tasks() {
    fn shareable<T: Send + Sync>(_: &T) {}
    fn spawnable<F: std::future::Future + Send>(_: F) {}
    let up = Upstream::new(UpstreamConfig::default()).unwrap();
    shareable(&up);
    let ep = up.default_registry().clone();
    spawnable(up.send(request(&ep, "library/alpine", "manifests/latest")));
}

#[test]
fn config_validation() {
    let cfg = |creds: Vec<RegistryCredential>| UpstreamConfig { credentials: creds, ..UpstreamConfig::default() };
    let c =
        |host: &str, pass: &str| RegistryCredential { host: host.into(), username: "u".into(), password: pass.into() };
    assert!(Upstream::new(cfg(vec![c("docker.io", "a"), c("https://index.docker.io/v1/", "a")])).is_ok());
    assert!(Upstream::new(cfg(vec![c("docker.io", "a"), c("index.docker.io", "b")])).is_err());
    assert!(Upstream::new(UpstreamConfig { default_registry: "ftp://x".into(), ..UpstreamConfig::default() }).is_err());
    assert!(!format!("{:?}", c("h", "hunter2")).contains("hunter2"));
}

#[tokio::test]
async fn percent_encoded_dot_segments_never_leave_v2() {
    let (up, state, addr) = setup(vec![]).await;
    let ep = http_endpoint(&up, addr);
    for repo in ["a/%2e%2e/%2e%2e/landing?", "a/%2E%2E/b", "a%2fb"] {
        let reply = up.send(request(&ep, repo, "blobs/sha256:x")).await;
        assert!(reply.is_err(), "{repo}: the registry saw {:?}", state.seen("/"));
    }
}

#[test]
fn configured_credentials_never_cross_plain_http_to_a_host_a_client_names() {
    use super::{configured_credentials_may_go, InsecureSet};
    let insecure = InsecureSet::new(&["lab.example:5000".to_owned()]).expect("insecure set");
    let ep = |host: &str, scheme| RegistryEndpoint { host: host.to_owned(), scheme };
    assert!(!configured_credentials_may_go(&ep("reg.example", SchemePolicy::Http), &insecure));
    assert!(configured_credentials_may_go(&ep("reg.example", SchemePolicy::Https), &insecure));
    assert!(configured_credentials_may_go(&ep("lab.example:5000", SchemePolicy::Http), &insecure));
    assert!(configured_credentials_may_go(&ep("127.0.0.1:5000", SchemePolicy::Http), &insecure));
    assert!(configured_credentials_may_go(&ep("lab.example:5000", SchemePolicy::InsecureHttpsThenHttp), &insecure));
}

#[tokio::test]
async fn a_redirect_to_a_link_local_address_is_not_followed() {
    let (up, state, addr) = setup(vec![]).await;
    let ep = http_endpoint(&up, addr);
    let started = std::time::Instant::now();
    let Err(err) = up.send(request(&ep, "redir/app", "blobs/sha256:metadata")).await else { panic!("followed") };
    assert!(format!("{err:?}").contains("169.254.169.254"), "{err:?}");
    // Refused before any connection was tried (one would wait for the connect timeout).
    assert!(started.elapsed() < std::time::Duration::from_secs(2));
    assert!(state.seen("/latest").is_empty());
}

#[tokio::test]
async fn a_token_realm_on_a_link_local_address_is_not_asked() {
    let (up, state, addr) = setup(vec![]).await;
    let ep = http_endpoint(&up, addr);
    let got = up.send(request(&ep, "metadata/app", "manifests/latest")).await;
    match got {
        // The registry's 401 goes back to the client, or the token error does: never a
        // "token" fetched from the metadata service and forwarded.
        Ok(reply) => assert_eq!(reply.response.status(), StatusCode::UNAUTHORIZED),
        Err(e) => assert!(e.to_string().contains("169.254.169.254"), "{e}"),
    }
    assert_eq!(state.token_calls.load(Ordering::SeqCst), 0);
    let sent: Vec<_> = state.seen("/v2/metadata").into_iter().filter_map(|s| s.1).collect();
    assert!(sent.is_empty(), "something was sent as a token: {sent:?}");
}

#[tokio::test]
async fn clients_cannot_name_registries_on_link_local_addresses_or_outside_the_allow_list() {
    let up = Upstream::new(UpstreamConfig::default()).unwrap();
    for ns in ["169.254.169.254", "169.254.169.254:80", "[fe80::1]:5000", "0.0.0.0:5000"] {
        assert!(matches!(up.select(None, Some(ns)), Err(UpstreamError::NotAllowed(_))), "{ns}");
    }
    assert!(matches!(up.select(Some("http://169.254.169.254/"), None), Err(UpstreamError::NotAllowed(_))));
    let cfg = UpstreamConfig {
        allow_registries: vec!["*.example.com".into()],
        insecure_registries: vec!["10.0.0.5:5000".into()],
        ..UpstreamConfig::default()
    };
    let listed = Upstream::new(cfg).unwrap();
    assert!(listed.select(None, Some("r.example.com")).is_ok());
    assert!(listed.select(None, Some("10.0.0.5:5000")).is_ok(), "the operator named it");
    assert!(listed.select(None, Some("index.docker.io")).is_ok(), "the default registry");
    assert!(matches!(listed.select(None, Some("ghcr.io")), Err(UpstreamError::NotAllowed(_))));
}

#[tokio::test]
async fn internal_addresses_are_reached_only_for_internal_or_named_registries() {
    let open = Upstream::new(UpstreamConfig::default()).unwrap();
    let reach = |up: &Upstream, ns: &str| up.reach_of(&up.select(None, Some(ns)).unwrap());
    assert_eq!(reach(&open, "127.0.0.1:5000"), Reach::Private, "a loopback registry named as such");
    assert_eq!(reach(&open, "10.1.2.3"), Reach::Private);
    assert_eq!(reach(&open, "localhost:5000"), Reach::Private);
    assert_eq!(reach(&open, "index.docker.io"), Reach::Private, "the operator's default registry");
    assert_eq!(reach(&open, "ghcr.io"), Reach::Public, "a name any client may give");
    let cfg = UpstreamConfig { allow_registries: vec!["registry.internal".into()], ..UpstreamConfig::default() };
    let listed = Upstream::new(cfg).unwrap();
    assert_eq!(reach(&listed, "registry.internal"), Reach::Private, "allow-listed by name");
}

#[tokio::test]
async fn a_registry_that_challenges_only_at_its_root_gets_the_configured_credentials() {
    let (up, state, addr) = setup(vec![user("pass")]).await;
    state.quiet.store(true, Ordering::SeqCst);
    let ep = http_endpoint(&up, addr);
    let reply = up.send(request(&ep, "quiet/app", "manifests/latest")).await.unwrap();
    assert_eq!(reply.response.status(), StatusCode::OK);
    assert_eq!(reply.credential, CredentialKind::Configured);
    assert_eq!(reply.response.text().await.unwrap(), "quiet");
}

#[tokio::test]
async fn a_bare_401_reaches_the_client_with_the_challenge_its_credentials_need() {
    let (up, state, addr) = setup(vec![]).await;
    state.quiet.store(true, Ordering::SeqCst);
    let ep = http_endpoint(&up, addr);
    let reply = up.send(request(&ep, "quiet/app", "manifests/latest")).await.unwrap();
    assert_eq!(reply.response.status(), StatusCode::UNAUTHORIZED);
    let challenge = reply.response.headers().get(header::WWW_AUTHENTICATE).map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(challenge.as_deref(), Some(r#"Basic realm="quiet""#));
}

#[test]
fn private_no_store_and_varying_responses_are_not_shared() {
    let with = |name: http::header::HeaderName, value: &'static str| {
        let mut h = http::HeaderMap::new();
        h.insert(name, http::HeaderValue::from_static(value));
        h
    };
    assert!(shared_caches_may_keep(&http::HeaderMap::new()));
    assert!(shared_caches_may_keep(&with(http::header::CACHE_CONTROL, "public, max-age=60")));
    assert!(!shared_caches_may_keep(&with(http::header::CACHE_CONTROL, "max-age=60, Private")));
    assert!(!shared_caches_may_keep(&with(http::header::CACHE_CONTROL, "no-store")));
    assert!(!shared_caches_may_keep(&with(http::header::CACHE_CONTROL, "private=\"set-cookie\"")));
    assert!(!shared_caches_may_keep(&with(http::header::VARY, "Accept-Encoding")));
}

#[tokio::test]
async fn a_plain_url_goes_only_where_the_callers_reach_allows() {
    let up = Upstream::new(UpstreamConfig::default()).unwrap();
    let refused = up.send_url(Method::HEAD, "http://127.0.0.1:9/file.bin", HeaderMap::new(), None, Some(Reach::Public));
    assert!(matches!(refused.await, Err(UpstreamError::NotAllowed(_))));
    let link_local = up.send_url(Method::HEAD, "http://169.254.169.254/latest", HeaderMap::new(), None, None);
    assert!(matches!(link_local.await, Err(UpstreamError::NotAllowed(_))));
}
