//! The API over a real socket: auth, errors and each protocol's shapes. Jobs are created but
//! not run (no runner here); `integration/tests/preheat.rs` runs them against a registry.

use std::sync::Arc;

use damselfly_scheduler::SchedulerConfig;
use serde_json::{json, Value};

use super::*;

struct Served {
    url: String,
    stop: CancellationToken,
    _dir: tempfile::TempDir,
}

async fn serve_api(credentials: Credentials) -> Served {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = JobStore::open_in(dir.path()).await.expect("store");
    let scheduler = Scheduler::new(SchedulerConfig::for_cluster(None, true).expect("config"));
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let address = listener.local_addr().expect("addr").to_string();
    let url = format!("http://{address}");
    let api = Arc::new(Api { store, scheduler, credentials, notification_scope: Scope::AllSeedPeers, address });
    let stop = CancellationToken::new();
    tokio::spawn(serve(listener, api, stop.clone()));
    Served { url, stop, _dir: dir }
}

impl Drop for Served {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn call(method: &str, url: &str, body: Option<&str>, auth: Option<&str>) -> (u16, Value) {
    let client = reqwest::Client::new();
    let mut req = client.request(method.parse().expect("method"), url).header("Accept", "application/json");
    if let Some(b) = body {
        req = req.header("Content-Type", "application/json").body(b.to_owned());
    }
    if let Some(a) = auth {
        req = req.header("Authorization", a);
    }
    let resp = req.send().await.expect("send");
    let status = resp.status().as_u16();
    let text = resp.text().await.expect("body");
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

/// What Harbor ≥ 2.12 sends, zero values and all.
fn harbor_job(url: &str) -> String {
    json!({"type": "preheat", "args": {"type": "image", "url": url, "tag": "", "filtered_query_params": "",
        "headers": {"Authorization": "Bearer harbor-jwt"}, "scope": "single_seed_peer", "concurrent_count": 0,
        "timeout": 0}, "scheduler_cluster_ids": [1]})
    .to_string()
}

#[tokio::test]
async fn harbors_open_api_exchange_has_its_shapes() {
    let s = serve_api(Credentials::default()).await;
    let (status, created) =
        call("POST", &format!("{}/oapi/v1/jobs", s.url), Some(&harbor_job("http://r.example/v2/a/manifests/1")), None)
            .await;
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_i64().expect("a numeric id");
    assert_eq!(created["state"], "PENDING");
    assert!(created["created_at"].as_str().is_some_and(|t| t.ends_with('Z') && t.len() == 20), "{created}");
    assert!(created["result"]["job_states"][0]["results"][0]["success_tasks"].is_array());
    assert!(created["args"].get("headers").is_none(), "credentials are never shown: {created}");
    let (status, polled) = call("GET", &format!("{}/oapi/v1/jobs/{id}", s.url), None, None).await;
    assert_eq!((status, polled["id"].as_i64()), (200, Some(id)));
    let (status, listed) = call("GET", &format!("{}/oapi/v1/jobs", s.url), None, None).await;
    assert_eq!((status, listed[0]["id"].as_i64()), (200, Some(id)));
    let (status, _) = call("GET", &format!("{}/healthy", s.url), None, None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn harbors_legacy_exchange_has_its_shapes() {
    let s = serve_api(Credentials::default()).await;
    let (status, ping) = call("GET", &format!("{}/_ping", s.url), None, None).await;
    assert_eq!((status, ping), (200, Value::String("OK".into())));
    let body = json!({"type": "image", "url": "http://r.example/v2/a/manifests/1",
        "headers": {"Authorization": "Bearer x"}, "image": "a", "tag": "1", "digest": ""})
    .to_string();
    let (status, created) = call("POST", &format!("{}/preheats", s.url), Some(&body), None).await;
    assert_eq!(status, 200);
    let id = created["ID"].as_str().expect("a string ID").to_owned();
    let (status, polled) = call("GET", &format!("{}/preheats/{id}", s.url), None, None).await;
    assert_eq!((status, polled["ID"].as_str(), polled["status"].as_str()), (200, Some(id.as_str()), Some("WAITING")));
    assert_eq!(polled["finishTime"], "");
    // The same image again while the first job is pending is that job.
    let (_, again) = call("POST", &format!("{}/preheats", s.url), Some(&body), None).await;
    assert_eq!(again["ID"].as_str(), Some(id.as_str()));
}

#[tokio::test]
async fn bad_input_gets_a_clear_status_and_message() {
    let s = serve_api(Credentials::default()).await;
    let (status, body) = call("GET", &format!("{}/oapi/v1/jobs/424242", s.url), None, None).await;
    assert_eq!(status, 404);
    assert!(body["errors"].as_str().is_some_and(|e| e.contains("424242")));
    assert_eq!(call("GET", &format!("{}/oapi/v1/jobs/abc", s.url), None, None).await.0, 404);
    assert_eq!(call("GET", &format!("{}/preheats/-1", s.url), None, None).await.0, 404);
    for bad in [
        "{",
        "[]",
        r#"{"type":"preheat"}"#,
        r#"{"type":"sync_peers","args":{"url":"http://r/v2/a/manifests/1"}}"#,
        r#"{"type":"preheat","args":{"url":""}}"#,
        r#"{"type":"preheat","args":{"url":"http://r/v2/a/manifests/1","scope":"everyone"}}"#,
        r#"{"type":"preheat","args":{"url":"http://r/v2/a/manifests/1","timeout":-5}}"#,
        r#"{"type":"preheat","args":{"type":"torrent","url":"http://r/v2/a/manifests/1"}}"#,
    ] {
        let (status, reply) = call("POST", &format!("{}/oapi/v1/jobs", s.url), Some(bad), None).await;
        assert_eq!(status, 422, "{bad}: {reply}");
        assert!(reply["errors"].as_str().is_some_and(|e| !e.is_empty()), "{bad}: {reply}");
    }
    assert_eq!(call("POST", &format!("{}/preheats", s.url), Some("{\"url\":1}"), None).await.0, 422);
    assert_eq!(call("DELETE", &format!("{}/oapi/v1/jobs/1", s.url), None, None).await.0, 405);
    assert_eq!(call("GET", &format!("{}/nothing", s.url), None, None).await.0, 404);
    let huge = format!("{{\"url\":\"{}\"}}", "x".repeat(2 << 20));
    assert_eq!(call("POST", &format!("{}/preheats", s.url), Some(&huge), None).await.0, 413);
    let (_, listed) = call("GET", &format!("{}/oapi/v1/jobs", s.url), None, None).await;
    assert_eq!(listed, json!([]), "no bad request created a job");
}

#[tokio::test]
async fn with_a_credential_configured_only_its_bearers_get_in() {
    let creds = Credentials::from_texts(Some("s3cret"), None, None).expect("creds");
    let s = serve_api(creds).await;
    let job = harbor_job("http://r.example/v2/a/manifests/1");
    for (auth, path) in [(None, "/oapi/v1/jobs"), (Some("Bearer wrong"), "/oapi/v1/jobs"), (None, "/api/v1/cluster")] {
        let (status, _) = call("POST", &format!("{}{path}", s.url), Some(&job), auth).await;
        assert_eq!(status, 401, "{auth:?} {path}");
    }
    assert_eq!(call("GET", &format!("{}/oapi/v1/jobs/1", s.url), None, None).await.0, 401);
    assert_eq!(call("POST", &format!("{}/registry/notifications", s.url), Some("{}"), None).await.0, 401);
    assert_eq!(call("GET", &format!("{}/healthy", s.url), None, None).await.0, 200, "health stays open");
    let (status, created) = call("POST", &format!("{}/oapi/v1/jobs", s.url), Some(&job), Some("Bearer s3cret")).await;
    assert_eq!(status, 200, "{created}");
    let (status, _) = call("GET", &format!("{}/oapi/v1/jobs?access_token=s3cret", s.url), None, None).await;
    assert_eq!(status, 200);
}

#[tokio::test]
async fn a_manifest_push_notification_starts_one_job_and_a_blob_push_none() {
    let s = serve_api(Credentials::default()).await;
    let envelope = json!({"events": [
        {"id": "1", "action": "push", "target": {"mediaType": "application/octet-stream",
            "url": "http://r.example/v2/a/blobs/sha256:aa"}},
        {"id": "2", "action": "pull", "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "url": "http://r.example/v2/a/manifests/sha256:bb"}},
        {"id": "3", "action": "push", "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "url": format!("http://r.example/v2/a/manifests/sha256:{}", "c".repeat(64))}},
        {"id": "4", "action": "push", "target": {"mediaType": "application/vnd.oci.image.manifest.v1+json",
            "url": "http://r.example/v2/a/manifests/sha256:not-a-digest"}},
    ]})
    .to_string();
    let (status, reply) = call("POST", &format!("{}/registry/notifications", s.url), Some(&envelope), None).await;
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["jobs"].as_array().map(Vec::len), Some(1));
    let (_, jobs) = call("GET", &format!("{}/api/v1/jobs", s.url), None, None).await;
    assert_eq!(jobs[0]["url"], format!("http://r.example/v2/a/manifests/sha256:{}", "c".repeat(64)));
    assert_eq!((jobs[0]["origin"].as_str(), jobs[0]["scope"].as_str()), (Some("notification"), Some("all_seed_peers")));
    // The registry retries; a pending job for the same manifest is not started twice.
    let (_, again) = call("POST", &format!("{}/registry/notifications", s.url), Some(&envelope), None).await;
    assert_eq!(again["jobs"], json!([]));
}

#[tokio::test]
async fn a_post_that_is_not_json_starts_nothing() {
    let s = serve_api(Credentials::default()).await;
    let form = "{\"url\":\"http://r.example/v2/a/manifests/1\"}";
    let resp = reqwest::Client::new()
        .post(format!("{}/api/v1/jobs", s.url))
        .header("Content-Type", "text/plain")
        .body(form)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 415);
    let resp = reqwest::Client::new().post(format!("{}/preheats", s.url)).body(form).send().await.expect("send");
    assert_eq!(resp.status().as_u16(), 415, "no Content-Type at all");
    let (_, listed) = call("GET", &format!("{}/api/v1/jobs", s.url), None, None).await;
    assert_eq!(listed, json!([]));
    let events = reqwest::Client::new()
        .post(format!("{}/registry/notifications", s.url))
        .header("Content-Type", "application/vnd.docker.distribution.events.v1+json")
        .body("{\"events\":[]}")
        .send()
        .await
        .expect("send");
    assert_eq!(events.status().as_u16(), 200, "the registry's own JSON type is JSON");
}

#[tokio::test]
async fn the_console_page_asks_for_the_credential_and_loads_nothing_from_elsewhere() {
    let creds = Credentials::from_texts(None, Some("admin:pw"), None).expect("creds");
    let s = serve_api(creds).await;
    let client = reqwest::Client::new();
    let denied = client.get(format!("{}/", s.url)).send().await.expect("send");
    assert_eq!(denied.status().as_u16(), 401);
    assert_eq!(denied.headers()["www-authenticate"], "Basic realm=\"damselfly\"", "a browser prompts for Basic");
    let page = client.get(format!("{}/", s.url)).basic_auth("admin", Some("pw")).send().await.expect("send");
    assert_eq!(page.status().as_u16(), 200);
    let policy = page.headers()["content-security-policy"].to_str().expect("policy").to_owned();
    assert!(policy.contains("default-src 'none'") && policy.contains("script-src 'self'"), "{policy}");
    let html = page.text().await.expect("html");
    let external = ["src=\"http", "href=\"http", "src=\"//", "href=\"//"].iter().any(|a| html.contains(a));
    assert!(html.contains("preheat-form") && !external, "no external asset");
    for asset in ["/console.js", "/console.css"] {
        let resp = client.get(format!("{}{asset}", s.url)).send().await.expect("send");
        assert_eq!(resp.status().as_u16(), 200, "{asset} holds no data and needs no credential");
    }
    let cluster =
        client.get(format!("{}/api/v1/cluster", s.url)).basic_auth("admin", Some("pw")).send().await.expect("send");
    let cluster: Value = serde_json::from_str(&cluster.text().await.expect("body")).expect("json");
    assert_eq!(cluster["schedulers"][0]["job_store"], "sqlite");
}

#[tokio::test]
async fn a_url_that_names_no_image_is_refused_before_any_job_exists() {
    let s = serve_api(Credentials::default()).await;
    for url in [
        "not a url",
        "ftp://r.example/v2/a/manifests/1",
        "https://u:p@r.example/v2/a/manifests/1",
        "https://r.example/a",
    ] {
        let body = json!({"type": "preheat", "args": {"url": url}}).to_string();
        let (status, reply) = call("POST", &format!("{}/oapi/v1/jobs", s.url), Some(&body), None).await;
        assert_eq!(status, 422, "{url}: {reply}");
    }
    let long = format!("https://r.example/v2/a/manifests/1?{}", "x".repeat(4000));
    let (status, _) =
        call("POST", &format!("{}/api/v1/jobs", s.url), Some(&json!({"url": long}).to_string()), None).await;
    assert_eq!(status, 422);
    let (_, listed) = call("GET", &format!("{}/api/v1/jobs", s.url), None, None).await;
    assert_eq!(listed, json!([]));
}

#[tokio::test]
async fn a_store_full_of_open_jobs_refuses_more_with_429() {
    let dir = tempfile::tempdir().expect("tempdir");
    let store = JobStore::open_in(dir.path()).await.expect("store");
    let spec = oapi::spec(harbor_job("http://r.example/v2/a/manifests/1").as_bytes()).expect("spec");
    for _ in 0..MAX_OPEN_JOBS {
        store.create(&spec).await.expect("create");
    }
    let scheduler = Scheduler::new(SchedulerConfig::for_cluster(None, true).expect("config"));
    let api = Api {
        store,
        scheduler,
        credentials: Credentials::default(),
        notification_scope: Scope::AllSeedPeers,
        address: String::new(),
    };
    assert!(matches!(api.create(&spec).await, Err(ApiError::Busy)));
    assert_eq!(ApiError::Busy.into_response().status(), StatusCode::TOO_MANY_REQUESTS);
}
