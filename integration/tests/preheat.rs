//! Preheat as Harbor and a registry drive it: both of Harbor's provider protocols replayed as
//! its client sends them, registry push notifications from a real `docker-registry`, the job
//! store on SQLite and on a real PostgreSQL shared by two schedulers, and bad input. The proof
//! that a preheat worked is the origin's access log: the blobs were fetched by the seed, and a
//! later pull fetches none.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use damselfly_control::auth::Credentials;
use damselfly_control::ControlConfig;
use damselfly_integration::cluster::{node_id, Cluster, SECRET};
use damselfly_integration::containerd::Containerd;
use damselfly_integration::origin::FileServer;
use damselfly_integration::postgres::Postgres;
use damselfly_integration::registry::{Image, Registry};
use damselfly_integration::scheduler::Scheduler;
use damselfly_integration::util::{http_client, poll_until};
use serde_json::{json, Value};

/// Harbor's personal access token, as configured on the scheduler.
const PAT: &str = "harbor-personal-access-token";

/// The test registries are on loopback: named, as an operator would name an internal one.
fn with_pat(c: &mut ControlConfig) {
    c.credentials = Credentials::from_texts(Some(PAT), None, None).expect("credentials");
    c.upstream.allow_registries = vec!["127.0.0.1".to_owned()];
    c.lease = Duration::from_secs(2);
}

fn open(c: &mut ControlConfig) {
    c.lease = Duration::from_secs(2);
    c.upstream.allow_registries = vec!["127.0.0.1".to_owned()];
}

fn only_named_registry(c: &mut ControlConfig) {
    c.upstream.allow_registries = vec!["registry.allowed.example".to_owned()];
}

fn sqlite_url(dir: &std::path::Path) -> String {
    format!("sqlite://{}?mode=rwc", dir.join("jobs.db").display())
}

/// Sends what Harbor's HTTP client sends: `Accept: application/json`, JSON bodies, the auth
/// header of its auth mode. Returns the status and the parsed body.
async fn harbor(method: &str, url: &str, body: Option<&Value>) -> Result<(u16, Value)> {
    let client = http_client();
    let mut req = client
        .request(method.parse()?, url)
        .header("Accept", "application/json")
        .header("Authorization", format!("Bearer {PAT}"));
    if let Some(b) = body {
        req = req.header("Content-Type", "application/json").body(serde_json::to_vec(b)?);
    }
    let resp = req.send().await?;
    let status = resp.status().as_u16();
    let text = resp.text().await?;
    Ok((status, serde_json::from_str(&text).unwrap_or(Value::String(text))))
}

/// A GET of the JSON API, with the token (ignored by a scheduler that asks for none).
async fn get_json(url: &str) -> Result<Value> {
    let resp = http_client().get(url).bearer_auth(PAT).send().await?;
    ensure!(resp.status().is_success(), "{url}: {}", resp.status());
    Ok(serde_json::from_slice(&resp.bytes().await?)?)
}

/// Waits until the scheduler has a seed with its seed stream open.
async fn wait_for_seed(sched: &Scheduler) -> Result<()> {
    let url = format!("{}/api/v1/cluster", sched.http_url());
    poll_until("a seed stream", Duration::from_secs(20), || {
        let url = url.clone();
        async move {
            let cluster = get_json(&url).await?;
            let seeding = cluster["hosts"].as_array().is_some_and(|h| h.iter().any(|h| h["seeding"] == true));
            Ok(seeding.then_some(()))
        }
    })
    .await
}

/// Polls a job as Harbor does (it waits 10 s between polls; tests poll faster) until it ends.
async fn poll_oapi(sched: &Scheduler, id: i64) -> Result<Value> {
    let url = format!("{}/oapi/v1/jobs/{id}", sched.http_url());
    poll_until("the preheat job to end", Duration::from_secs(90), || {
        let url = url.clone();
        async move {
            let (status, job) = harbor("GET", &url, None).await?;
            ensure!(status == 200, "poll: {status} {job}");
            let state = job["state"].as_str().context("state")?.to_owned();
            ensure!(["PENDING", "RUNNING", "SUCCESS", "FAILURE"].contains(&state.as_str()), "Harbor fails on {state}");
            Ok(matches!(state.as_str(), "SUCCESS" | "FAILURE").then_some(job))
        }
    })
    .await
}

/// Creates a job for `url` as Harbor would and waits for it to fail; returns its reason.
async fn fails(api: &str, url: &str) -> Result<String> {
    let job = json!({"type": "preheat", "args": {"url": url}});
    let (status, created) = harbor("POST", &format!("{api}/oapi/v1/jobs"), Some(&job)).await?;
    ensure!(status == 200, "{status} {created}");
    let id = created["id"].as_i64().context("id")?;
    let job_url = format!("{api}/oapi/v1/jobs/{id}");
    let failed = poll_until("the job to fail", Duration::from_secs(60), || {
        let u = job_url.clone();
        async move {
            let (_, j) = harbor("GET", &u, None).await?;
            ensure!(j["state"] != "SUCCESS", "{j}");
            Ok((j["state"] == "FAILURE").then_some(j))
        }
    })
    .await?;
    Ok(failed["result"]["job_states"][0]["error"].as_str().context("error")?.to_owned())
}

/// The job Harbor ≥ 2.12 posts for `image` on `origin`, field for field.
fn harbor_job(origin: &Registry, image: &Image, scope: &str) -> Value {
    json!({
        "type": "preheat",
        "args": {
            "type": "image",
            "url": format!("{}/v2/{}/manifests/{}", origin.url(), image.repo, image.tag),
            "tag": "",
            "filtered_query_params": "",
            "headers": {"Authorization": "Bearer harbor-jwt-for-the-registry"},
            "scope": scope,
            "concurrent_count": 0,
            "timeout": 0
        },
        "scheduler_cluster_ids": [1]
    })
}

/// The hosts a finished job names as having succeeded, sorted.
fn succeeded_hosts(done: &Value) -> Vec<String> {
    let tasks = done["result"]["job_states"][0]["results"][0]["success_tasks"].as_array().cloned().unwrap_or_default();
    let mut hosts: Vec<String> = tasks.iter().filter_map(|t| t["hostname"].as_str().map(str::to_owned)).collect();
    hosts.sort();
    hosts
}

/// Blob GETs the origin answered so far (whole reads and ranges).
fn blob_gets(origin: &Registry) -> usize {
    origin.access_log().entries.iter().filter(|e| e.method == "GET" && e.uri.contains("/blobs/")).count()
}

#[tokio::test]
async fn harbors_current_protocol_preheats_an_index_and_a_later_pull_fetches_no_blob_from_the_origin() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_index("harbor/app", "v1", 2, "linux/amd64,linux/arm64").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start_with_control([127, 0, 0, 1], SECRET, &sqlite_url(dir.path()), with_pat).await.unwrap();
    let cluster = Cluster::start_with(&origin, vec![sched], 2, |i, o| if i == 0 { o.seed() } else { o }).await.unwrap();
    let sched = &cluster.schedulers[0];
    wait_for_seed(sched).await.unwrap();
    let api = sched.http_url();

    // Harbor's instance health check, then the job, then polls.
    let (status, _) = harbor("GET", &format!("{api}/healthy"), None).await.unwrap();
    assert_eq!(status, 200);
    let (status, created) =
        harbor("POST", &format!("{api}/oapi/v1/jobs"), Some(&harbor_job(&origin, &image, "single_seed_peer")))
            .await
            .unwrap();
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_i64().expect("Harbor needs a numeric id");
    let done = poll_oapi(sched, id).await.unwrap();
    assert_eq!(done["state"], "SUCCESS", "{done}");
    let results = &done["result"]["job_states"][0]["results"][0];
    let hosts: Vec<&str> =
        results["success_tasks"].as_array().unwrap().iter().filter_map(|t| t["hostname"].as_str()).collect();
    assert_eq!(hosts, [node_id(0).as_str()], "{done}");
    assert_eq!(results["failure_tasks"], json!([]));

    // Both platforms' blobs came from the origin once each, fetched by the seed.
    let log = origin.settled_access_log().await;
    log.assert_copies_at_most(&image.blobs, 1.05);
    assert!(log.blobs_fetched_only_by(&image.blobs, "damselfly"), "every blob fetched by the seed");
    let detail = get_json(&format!("{api}/api/v1/jobs/{id}")).await.unwrap();
    assert_eq!(detail["blobs"].as_array().map(Vec::len), Some(image.blobs.len()), "{detail}");
    assert!(detail["blobs"].as_array().unwrap().iter().all(|b| b["holders"] == json!([node_id(0)])));

    // A pull through the other node after the preheat: no blob from the origin.
    let before = blob_gets(&origin);
    let ctr = Containerd::start().await.unwrap();
    ctr.write_hosts_toml(&origin.host(), &origin.url(), &cluster.node(1).url()).unwrap();
    ctr.pull(&image.reference).await.unwrap();
    // The node still asks the registry whether this client may read each blob (a ranged read
    // of at most 4 KiB, `docs/security.md`); no blob itself comes from the origin.
    let log = origin.settled_access_log().await;
    let during: Vec<_> =
        log.entries.iter().filter(|e| e.method == "GET" && e.uri.contains("/blobs/")).skip(before).collect();
    assert!(during.iter().all(|e| e.status == 206 && e.bytes <= 4096), "blob bytes from the origin: {during:?}");
    assert!(during.len() <= 4, "one access proof per blob of one platform at most: {during:?}");
    let node = cluster.metrics(1).await.unwrap();
    assert!(
        node.sum("damselfly_download_bytes_total", &[("source", "peer")]) > 0.0,
        "the node took pieces from its peer"
    );
    cluster.shutdown().await;
}

#[tokio::test]
async fn harbors_legacy_protocol_preheats_and_reports_an_image_already_preheated() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_index("legacy/app", "v1", 1, "linux/amd64,linux/arm64").await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start_with_control([127, 0, 0, 1], SECRET, &sqlite_url(dir.path()), with_pat).await.unwrap();
    let cluster = Cluster::start_with(&origin, vec![sched], 1, |_, o| o.seed()).await.unwrap();
    let sched = &cluster.schedulers[0];
    wait_for_seed(sched).await.unwrap();
    let api = sched.http_url();

    let (status, _) = harbor("GET", &format!("{api}/_ping"), None).await.unwrap();
    assert_eq!(status, 200);
    let body = json!({
        "type": "image",
        "url": format!("{}/v2/{}/manifests/{}", origin.url(), image.repo, image.tag),
        "headers": {"Authorization": "Bearer harbor-jwt"},
        "image": image.repo, "tag": image.tag, "digest": image.manifest_digest,
    });
    let (status, created) = harbor("POST", &format!("{api}/preheats"), Some(&body)).await.unwrap();
    assert_eq!(status, 200, "{created}");
    let id = created["ID"].as_str().expect("Harbor's legacy client needs a string ID").to_owned();
    let status_url = format!("{api}/preheats/{id}");
    let done = poll_until("the legacy preheat", Duration::from_secs(60), || {
        let url = status_url.clone();
        async move {
            let (code, s) = harbor("GET", &url, None).await?;
            ensure!(code == 200, "{code} {s}");
            let status = s["status"].as_str().context("status")?.to_owned();
            ensure!(["WAITING", "RUNNING", "SUCCESS", "FAILED"].contains(&status.as_str()), "unknown status {status}");
            Ok(matches!(status.as_str(), "SUCCESS" | "FAILED").then_some(s))
        }
    })
    .await
    .unwrap();
    assert_eq!(done["status"], "SUCCESS", "{done}");
    assert!(done["finishTime"].as_str().is_some_and(|t| t.ends_with('Z')));
    origin.settled_access_log().await.assert_copies_at_most(&image.blobs, 1.05);

    // Harbor asks again: the image is preheated already.
    let (status, again) = harbor("POST", &format!("{api}/preheats"), Some(&body)).await.unwrap();
    assert_eq!((status, again["ID"].as_str()), (208, Some(id.as_str())));
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_push_to_a_notifying_registry_preheats_the_image_on_the_seed() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start_with_control([127, 0, 0, 1], SECRET, &sqlite_url(dir.path()), with_pat).await.unwrap();
    let endpoint = format!("{}/registry/notifications", sched.http_url());
    let origin = Registry::start_notifying(&endpoint, &format!("Bearer {PAT}")).await.unwrap();
    let cluster = Cluster::start_with(&origin, vec![sched], 1, |_, o| o.seed()).await.unwrap();
    let sched = &cluster.schedulers[0];
    wait_for_seed(sched).await.unwrap();

    // skopeo pushes; nothing else is called.
    let image = origin.push_image("notified/app", "v1", 1).await.unwrap();
    let jobs_url = format!("{}/api/v1/jobs", sched.http_url());
    let job = poll_until("a job from the registry's notification to succeed", Duration::from_secs(60), || {
        let url = jobs_url.clone();
        async move {
            let jobs = get_json(&url).await?;
            let done = jobs
                .as_array()
                .and_then(|j| j.iter().find(|j| j["origin"] == "notification" && j["state"] == "SUCCESS"));
            Ok(done.cloned())
        }
    })
    .await
    .unwrap();
    assert!(job["url"].as_str().is_some_and(|u| u.contains("/v2/notified/app/manifests/")), "{job}");
    let log = origin.settled_access_log().await;
    assert!(log.blobs_fetched_only_by(&image.blobs, "damselfly"), "the seed fetched every blob");
    log.assert_copies_at_most(&image.blobs, 1.05);
    let seed_dir = cluster.node(0).data_dir().to_owned();
    for (digest, _) in &image.blobs {
        let held = damselfly_integration::util::walk_files(&seed_dir)
            .iter()
            .any(|p| p.to_string_lossy().contains(digest.trim_start_matches("sha256:")));
        assert!(held, "the seed holds {digest}");
    }
    cluster.shutdown().await;
}

#[tokio::test]
async fn two_schedulers_on_one_postgres_share_jobs_and_one_takes_over_when_the_other_dies() {
    let pg = Postgres::start().await.unwrap();
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("shared/app", "v1", 1).await.unwrap();
    let a = Scheduler::start_with_control([127, 0, 0, 1], SECRET, &pg.url(), open).await.unwrap();
    let b = Scheduler::start_with_control([127, 0, 0, 1], SECRET, &pg.url(), open).await.unwrap();
    let (a_api, b_api) = (a.http_url(), b.http_url());

    // No seed yet: the job is claimed and waits for one.
    let job = json!({"type": "preheat", "args": {"type": "image", "url": format!("{}/v2/{}/manifests/{}", origin.url(), image.repo, image.tag), "scope": "single_seed_peer"}});
    let (status, created) = harbor("POST", &format!("{a_api}/oapi/v1/jobs"), Some(&job)).await.unwrap();
    assert_eq!(status, 200, "{created}");
    let id = created["id"].as_i64().unwrap();
    let running = poll_until("the job to be claimed", Duration::from_secs(20), || {
        let url = format!("{b_api}/api/v1/jobs/{id}");
        async move {
            let j = get_json(&url).await?;
            Ok((j["state"] == "RUNNING").then_some(j))
        }
    })
    .await
    .unwrap();
    let runner = running["runner"].as_str().unwrap().to_owned();
    let (mut dies, survivor) = if runner.starts_with(&a.http_addr.to_string()) { (a, b) } else { (b, a) };
    let survivor_addr = survivor.http_addr.to_string();
    dies.kill().await;

    // A seed joins the survivor, which takes the job over once the lease lapses.
    let cluster = Cluster::start_with(&origin, vec![survivor], 1, |_, o| o.seed()).await.unwrap();
    let sched = &cluster.schedulers[0];
    let done = poll_oapi(sched, id).await.unwrap();
    assert_eq!(done["state"], "SUCCESS", "{done}");
    let detail = get_json(&format!("{}/api/v1/jobs/{id}", sched.http_url())).await.unwrap();
    assert!(detail["runner"].as_str().is_some_and(|r| r.starts_with(&survivor_addr)), "{detail}");
    origin.settled_access_log().await.assert_copies_at_most(&image.blobs, 1.05);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_scheduler_restarted_on_sqlite_loses_no_job_and_resumes_the_running_one() {
    let origin = Registry::start().await.unwrap();
    let first = origin.push_image("restart/app", "v1", 0).await.unwrap();
    let second = origin.push_image("restart/app", "v2", 0).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start_with_control([127, 0, 0, 1], SECRET, &sqlite_url(dir.path()), open).await.unwrap();
    let mut cluster = Cluster::start_with(&origin, vec![sched], 1, |_, o| o.seed()).await.unwrap();
    wait_for_seed(&cluster.schedulers[0]).await.unwrap();
    let url = |image: &Image| format!("{}/v2/{}/manifests/{}", origin.url(), image.repo, image.tag);
    let create = |api: String, image_url: String| async move {
        let job = json!({"type": "preheat", "args": {"url": image_url, "scope": "single_seed_peer"}});
        let (status, created) = harbor("POST", &format!("{api}/oapi/v1/jobs"), Some(&job)).await?;
        ensure!(status == 200, "{status} {created}");
        created["id"].as_i64().context("id")
    };
    let done_id = create(cluster.schedulers[0].http_url(), url(&first)).await.unwrap();
    assert_eq!(poll_oapi(&cluster.schedulers[0], done_id).await.unwrap()["state"], "SUCCESS");

    // The seed goes away; a new job waits for one while the scheduler restarts.
    cluster.kill(0).await;
    let waiting_id = create(cluster.schedulers[0].http_url(), url(&second)).await.unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.schedulers[0].restart().await.unwrap();
    let api = cluster.schedulers[0].http_url();
    let listed = get_json(&format!("{api}/api/v1/jobs")).await.unwrap();
    let ids: Vec<i64> = listed.as_array().unwrap().iter().filter_map(|j| j["id"].as_i64()).collect();
    assert_eq!(ids, vec![waiting_id, done_id]);
    assert_eq!(get_json(&format!("{api}/api/v1/jobs/{done_id}")).await.unwrap()["state"], "SUCCESS");

    // A seed again, and the job resumes to the end.
    let seed = damselfly_integration::mirror::Mirror::start(
        damselfly_integration::mirror::MirrorOpts::new(&origin.url())
            .cluster(damselfly_integration::cluster::node_ip(5), &[cluster.schedulers[0].url()], "seed-again")
            .seed(),
    )
    .await
    .unwrap();
    let done = poll_oapi(&cluster.schedulers[0], waiting_id).await.unwrap();
    assert_eq!(done["state"], "SUCCESS", "{done}");
    seed.shutdown().await;
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_job_naming_a_registry_outside_the_allow_list_or_unreachable_fails_with_the_reason() {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start_with_control([127, 0, 0, 1], SECRET, &sqlite_url(dir.path()), only_named_registry)
        .await
        .unwrap();
    let reason = fails(&sched.http_url(), "https://registry.other.example/v2/a/manifests/1").await.unwrap();
    assert!(reason.contains("not allowed"), "{reason}");
    let mut sched = sched;
    sched.stop().await;

    // The registry is allowed but nobody listens there.
    let dir = tempfile::tempdir().unwrap();
    fn allow_unreachable(c: &mut ControlConfig) {
        c.upstream.allow_registries = vec!["127.0.0.1:1".to_owned()];
    }
    let sched = Scheduler::start_with_control([127, 0, 0, 1], SECRET, &sqlite_url(dir.path()), allow_unreachable)
        .await
        .unwrap();
    let reason = fails(&sched.http_url(), "http://127.0.0.1:1/v2/a/manifests/1").await.unwrap();
    assert!(reason.contains("127.0.0.1:1"), "{reason}");
    let mut sched = sched;
    sched.stop().await;

    // Any registry allowed, but an internal address nobody named is not reached: the registry
    // there sees no request.
    let internal = Registry::start().await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    fn any_registry(c: &mut ControlConfig) {
        c.upstream.allow_registries = Vec::new();
    }
    let sched =
        Scheduler::start_with_control([127, 0, 0, 1], SECRET, &sqlite_url(dir.path()), any_registry).await.unwrap();
    let reason = fails(&sched.http_url(), &format!("{}/v2/a/manifests/1", internal.url())).await.unwrap();
    assert!(reason.contains("not allowed"), "{reason}");
    assert_eq!(
        internal.settled_access_log().await.count("GET", "/v2/a/"),
        0,
        "the scheduler reached an internal address"
    );
    let mut sched = sched;
    sched.stop().await;
}

#[tokio::test]
async fn an_all_peers_preheat_puts_every_blob_on_every_node_for_one_origin_copy() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("everyone/app", "v1", 4).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start_with_control([127, 0, 0, 1], SECRET, &sqlite_url(dir.path()), with_pat).await.unwrap();
    let cluster = Cluster::start_with(&origin, vec![sched], 4, |i, o| if i == 0 { o.seed() } else { o }).await.unwrap();
    let sched = &cluster.schedulers[0];
    let api = sched.http_url();
    poll_until("every node's preheat stream", Duration::from_secs(20), || {
        let url = format!("{api}/api/v1/cluster");
        async move {
            let c = get_json(&url).await?;
            let open = c["hosts"].as_array().map_or(0, |h| h.iter().filter(|h| h["preheating"] == true).count());
            Ok((open == 4).then_some(()))
        }
    })
    .await
    .unwrap();

    let (status, created) =
        harbor("POST", &format!("{api}/oapi/v1/jobs"), Some(&harbor_job(&origin, &image, "all_peers"))).await.unwrap();
    assert_eq!(status, 200, "{created}");
    let done = poll_oapi(sched, created["id"].as_i64().unwrap()).await.unwrap();
    assert_eq!(done["state"], "SUCCESS", "{done}");
    let hosts = succeeded_hosts(&done);
    assert_eq!(hosts, (0..4).map(node_id).collect::<Vec<_>>());
    // Four nodes hold the image; the origin served it about once.
    origin.settled_access_log().await.assert_copies_at_most(&image.blobs, 1.05);
    for i in 0..4 {
        let files = damselfly_integration::util::walk_files(cluster.node(i).data_dir());
        for (digest, _) in &image.blobs {
            let hex = digest.trim_start_matches("sha256:");
            assert!(files.iter().any(|p| p.to_string_lossy().contains(hex)), "node {i} holds {digest}");
        }
    }
    cluster.shutdown().await;
}

/// A job of type `file` for a plain URL, as Harbor's client shapes a job.
fn file_job(url: &str, scope: &str, authorization: Option<&str>) -> Value {
    let headers = authorization.map_or_else(|| json!({}), |a| json!({"Authorization": a}));
    json!({
        "type": "preheat",
        "args": {"type": "file", "url": url, "tag": "", "filtered_query_params": "", "headers": headers,
                 "scope": scope, "concurrent_count": 0, "timeout": 0},
        "scheduler_cluster_ids": [1]
    })
}

/// A client that sends plain HTTP through node `i`'s proxy.
fn through_node(cluster: &Cluster, i: usize) -> reqwest::Client {
    reqwest::Client::builder()
        .proxy(reqwest::Proxy::http(cluster.node(i).url()).expect("proxy url"))
        .timeout(Duration::from_secs(60))
        .build()
        .expect("client")
}

/// A cluster of `nodes` (the first a seed) whose proxies look for `.bin` files among
/// preheated ones; its seed fetches files from any origin when `any_origin`, else only from the
/// registry it names (the default). Returns it with its scheduler's API and the directory of
/// its job store.
async fn file_cluster(
    origin: &Registry,
    nodes: usize,
    any_origin: bool,
    tweak: fn(&mut ControlConfig),
) -> (Cluster, String, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let sched = Scheduler::start_with_control([127, 0, 0, 1], SECRET, &sqlite_url(dir.path()), tweak).await.unwrap();
    let cluster = Cluster::start_with(origin, vec![sched], nodes, |i, mut o| {
        o.config.proxy_rules = vec!["blobs/sha256.*".to_owned(), r"\.bin$".to_owned()];
        if any_origin {
            o.config.seed_registries = vec!["*".to_owned()];
        }
        if i == 0 {
            o.seed()
        } else {
            o
        }
    })
    .await
    .unwrap();
    let api = cluster.schedulers[0].http_url();
    let want = nodes;
    poll_until("every node's preheat stream", Duration::from_secs(20), || {
        let url = format!("{api}/api/v1/cluster");
        async move {
            let c = get_json(&url).await?;
            let open = c["hosts"].as_array().map_or(0, |h| h.iter().filter(|h| h["preheating"] == true).count());
            Ok((open == want).then_some(()))
        }
    })
    .await
    .unwrap();
    (cluster, api, dir)
}

/// Creates a file job and waits for it to end.
async fn run_file_job(cluster: &Cluster, api: &str, job: &Value) -> Value {
    let (status, created) = harbor("POST", &format!("{api}/oapi/v1/jobs"), Some(job)).await.unwrap();
    assert_eq!(status, 200, "{created}");
    poll_oapi(&cluster.schedulers[0], created["id"].as_i64().unwrap()).await.unwrap()
}

/// Proxy requests node `i` served from preheated files.
async fn served_preheated(cluster: &Cluster, i: usize) -> f64 {
    cluster.metrics(i).await.unwrap().sum("damselfly_proxy_requests_total", &[("kind", "preheated"), ("status", "200")])
}

#[tokio::test]
async fn a_file_preheated_from_a_plain_url_is_served_through_the_proxy_without_another_origin_copy() {
    let registry = Registry::start().await.unwrap();
    let files = FileServer::start().await.unwrap();
    let data = damselfly_integration::util::random_bytes(6 << 20);
    files.put("model.bin", &data).unwrap();
    let (cluster, api, _jobs) = file_cluster(&registry, 3, true, with_pat).await;
    let url = files.url("model.bin");

    let done = run_file_job(&cluster, &api, &file_job(&url, "all_peers", None)).await;
    assert_eq!(done["state"], "SUCCESS", "{done}");
    let hosts = succeeded_hosts(&done);
    assert_eq!(hosts, (0..3).map(node_id).collect::<Vec<_>>());
    // One copy from the origin, by the seed; the others took it from peers.
    assert_eq!(files.requests("GET", "model.bin").len(), 1, "{:?}", files.access_log());
    for i in 1..3 {
        let m = cluster.metrics(i).await.unwrap();
        assert!(m.sum("damselfly_fetched_bytes_total", &[("source", "peer")]) >= data.len() as f64, "node {i}");
    }

    // A client of a node's proxy gets the file from the cluster: the origin sees a HEAD only.
    let resp = through_node(&cluster, 2).get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.headers().get("via").and_then(|v| v.to_str().ok()), Some("1.1 damselfly"));
    assert!(resp.bytes().await.unwrap() == data, "the preheated bytes");
    assert_eq!(files.requests("GET", "model.bin").len(), 1, "{:?}", files.access_log());
    assert!(!files.requests("HEAD", "model.bin").is_empty());
    assert_eq!(served_preheated(&cluster, 2).await, 1.0);

    // The file changes at its origin, same length, a later time: never the old one.
    let newer = damselfly_integration::util::random_bytes(6 << 20);
    files.put("model.bin", &newer).unwrap();
    files.touch("model.bin", std::time::SystemTime::now() + Duration::from_secs(5)).unwrap();
    let resp = through_node(&cluster, 1).get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap() == newer, "the origin's current file");
    assert_eq!(files.requests("GET", "model.bin").len(), 2, "forwarded to the origin");
    assert_eq!(served_preheated(&cluster, 1).await, 0.0);
    cluster.shutdown().await;
}

/// Lets a job's `Authorization` travel to the seed, as a cluster with client certificates does.
fn with_pat_forwarding(c: &mut ControlConfig) {
    with_pat(c);
    c.forward_credentials = true;
}

#[tokio::test]
async fn a_preheated_private_file_is_served_only_to_clients_its_origin_lets_read_it() {
    use damselfly_integration::origin::PRIVATE_TOKEN;
    let registry = Registry::start().await.unwrap();
    let files = FileServer::start().await.unwrap();
    let data = damselfly_integration::util::random_bytes(9 << 20);
    files.put("private/weights.bin", &data).unwrap();
    let (cluster, api, _jobs) = file_cluster(&registry, 2, true, with_pat_forwarding).await;
    let url = files.url("private/weights.bin");
    let bearer = format!("Bearer {PRIVATE_TOKEN}");

    // Asked for without the credential, the origin's answer is the job's reason.
    let done = run_file_job(&cluster, &api, &file_job(&url, "single_seed_peer", None)).await;
    assert_eq!(done["state"], "FAILURE");
    assert!(done["result"]["job_states"][0]["error"].as_str().unwrap().contains("401"), "{done}");

    // Only the seed keeps it: node 1's proxy streams it from the seed.
    let done = run_file_job(&cluster, &api, &file_job(&url, "single_seed_peer", Some(&bearer))).await;
    assert_eq!(done["state"], "SUCCESS", "{done}");
    let origin_gets = || files.requests("GET", "private/weights.bin").iter().filter(|a| a.status == 200).count();
    assert_eq!(origin_gets(), 1);

    // Without the token the origin refuses the client, and so does the proxy.
    let resp = through_node(&cluster, 1).get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    assert_eq!(served_preheated(&cluster, 1).await, 0.0);
    let resp = through_node(&cluster, 1).get(&url).header("Authorization", &bearer).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.bytes().await.unwrap() == data);
    assert_eq!(served_preheated(&cluster, 1).await, 1.0);
    assert_eq!(origin_gets(), 1, "served from the cluster: {:?}", files.access_log());
    let m = cluster.metrics(1).await.unwrap();
    assert!(m.sum("damselfly_fetched_bytes_total", &[("source", "peer")]) >= data.len() as f64);
    cluster.shutdown().await;
}

#[tokio::test]
async fn a_file_job_that_cannot_be_done_fails_at_once_with_the_reason() {
    use damselfly_integration::origin::PRIVATE_TOKEN;
    let registry = Registry::start().await.unwrap();
    let files = FileServer::start().await.unwrap();
    files.put("public.bin", b"public bytes").unwrap();
    files.put("private/secret.bin", b"secret bytes").unwrap();
    // The seed fetches from its registry only, and gets no job credential.
    let (cluster, api, _jobs) = file_cluster(&registry, 1, false, with_pat).await;
    let error = |done: &Value| done["result"]["job_states"][0]["error"].as_str().unwrap_or_default().to_owned();

    let done = run_file_job(&cluster, &api, &file_job(&files.url("nowhere.bin"), "single_seed_peer", None)).await;
    assert_eq!(done["state"], "FAILURE");
    assert!(error(&done).contains("404"), "{done}");

    let bearer = format!("Bearer {PRIVATE_TOKEN}");
    let job = file_job(&files.url("private/secret.bin"), "single_seed_peer", Some(&bearer));
    let done = run_file_job(&cluster, &api, &job).await;
    assert_eq!(done["state"], "FAILURE");
    assert!(error(&done).contains("needs the job's Authorization"), "{done}");

    let started = std::time::Instant::now();
    let done = run_file_job(&cluster, &api, &file_job(&files.url("public.bin"), "single_seed_peer", None)).await;
    assert_eq!(done["state"], "FAILURE");
    assert!(error(&done).contains("could not fetch") && error(&done).contains("seed_registries"), "{done}");
    assert!(started.elapsed() < Duration::from_secs(30), "the seed's reason ends the job");
    assert!(files.requests("GET", "public.bin").is_empty());
    cluster.shutdown().await;
}
