//! The console in headless Chromium against a running cluster: nodes, tasks and jobs appear, a
//! preheat started from the form runs to the end, values from the API are shown as text, and
//! the page fits a phone. Screenshots go to `target/test-artifacts/`.

use std::time::Duration;

use damselfly_control::auth::Credentials;
use damselfly_control::ControlConfig;
use damselfly_integration::chromium::{artifacts_dir, chromium_missing, Browser};
use damselfly_integration::cluster::{Cluster, SECRET};
use damselfly_integration::registry::Registry;
use damselfly_integration::scheduler::Scheduler;
use damselfly_integration::util::{http_client, poll_until};
use serde_json::{json, Value};

const PAT: &str = "console-token";

/// The test registries are on loopback: named, as an operator would name an internal one.
fn with_pat(c: &mut ControlConfig) {
    c.credentials = Credentials::from_texts(Some(PAT), None, None).expect("credentials");
    c.upstream.allow_registries = vec!["127.0.0.1".to_owned()];
}

async fn api(method: &str, url: &str, body: Option<Value>) -> Value {
    let mut req = http_client().request(method.parse().unwrap(), url).bearer_auth(PAT);
    if let Some(b) = body {
        req = req.header("Content-Type", "application/json").body(b.to_string());
    }
    let resp = req.send().await.unwrap();
    assert!(resp.status().is_success(), "{url}: {}", resp.status());
    serde_json::from_slice(&resp.bytes().await.unwrap()).unwrap()
}

async fn until_job_succeeds(api_url: &str, id: i64) {
    poll_until("the job to succeed", Duration::from_secs(60), || async move {
        let job = api("GET", &format!("{api_url}/api/v1/jobs/{id}"), None).await;
        anyhow::ensure!(job["state"] != "FAILURE", "{job}");
        Ok((job["state"] == "SUCCESS").then_some(()))
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn the_console_shows_the_cluster_and_starts_a_preheat_from_its_form() {
    if let Some(why) = chromium_missing() {
        eprintln!("SKIPPED the console test: {why}");
        return;
    }
    let origin = Registry::start().await.unwrap();
    let first = origin.push_image("console/app", "v1", 1).await.unwrap();
    let second = origin.push_image("console/app", "v2", 1).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = format!("sqlite://{}?mode=rwc", dir.path().join("jobs.db").display());
    let sched = Scheduler::start_with_control([127, 0, 0, 1], SECRET, &store, with_pat).await.unwrap();
    let cluster = Cluster::start_with(&origin, vec![sched], 2, |i, o| if i == 0 { o.seed() } else { o }).await.unwrap();
    cluster.wait_for_hosts(2.0).await.unwrap();
    let base = cluster.schedulers[0].http_url();

    // A job through the API, then a pull through the ordinary node, so every table has rows
    // and the chart has bytes from a peer.
    let manifest = |tag: &str| format!("{}/v2/console/app/manifests/{tag}", origin.url());
    poll_until("a seed stream", Duration::from_secs(20), || {
        let url = format!("{base}/api/v1/cluster");
        async move {
            Ok(api("GET", &url, None).await["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["seeding"] == true)
                .then_some(()))
        }
    })
    .await
    .unwrap();
    let job = api("POST", &format!("{base}/api/v1/jobs"), Some(json!({"url": manifest("v1")}))).await;
    let first_id = job["id"].as_i64().unwrap();
    until_job_succeeds(&base, first_id).await;
    let (digest, _) = first.largest_blob();
    let resp =
        http_client().get(cluster.node(1).blob_url_ns(&first.repo, &digest, &origin.host())).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    resp.bytes().await.unwrap();
    poll_until("node-1's served bytes to be announced", Duration::from_secs(15), || {
        let url = format!("{base}/api/v1/cluster");
        async move {
            let c = api("GET", &url, None).await;
            Ok(c["hosts"]
                .as_array()
                .unwrap()
                .iter()
                .any(|h| h["id"] == "node-1" && h["served_peer"].as_u64() > Some(0))
                .then_some(()))
        }
    })
    .await
    .unwrap();

    let mut browser = Browser::start().await.unwrap();
    browser.viewport(390, 844, true).await.unwrap();
    browser.navigate(&format!("{base}/?access_token={PAT}")).await.unwrap();
    let long = Duration::from_secs(20);
    browser
        .wait_for(
            "both nodes",
            "['node-0','node-1'].every(n => document.querySelector('#host-table').innerText.includes(n))",
            long,
        )
        .await
        .unwrap();
    let short = &digest[..19];
    browser
        .wait_for("the task", &format!("document.querySelector('#task-table').innerText.includes('{short}')"), long)
        .await
        .unwrap();
    browser
        .wait_for("the job", "document.querySelector('#job-table').innerText.includes('SUCCESS')", long)
        .await
        .unwrap();
    browser.wait_for("the chart", "document.querySelectorAll('#chart .chart-row').length === 2", long).await.unwrap();
    let peer_bar = browser
        .eval("[...document.querySelectorAll('#chart .chart-row')].some(r => parseFloat(r.querySelector('.peer').style.width) > 0)")
        .await
        .unwrap();
    assert_eq!(peer_bar, json!(true), "the chart shows bytes a node served from its peer");
    assert_eq!(
        browser.eval("document.documentElement.scrollWidth <= window.innerWidth + 1").await.unwrap(),
        json!(true),
        "fits a phone"
    );
    browser.screenshot(&artifacts_dir().join("console-phone.png")).await.unwrap();

    // A preheat started from the form.
    let fill = format!(
        "document.getElementById('preheat-url').value = '{}'; \
         document.getElementById('preheat-scope').value = 'all_seed_peers'; \
         document.getElementById('preheat-start').click(); true",
        manifest("v2")
    );
    browser.eval(&fill).await.unwrap();
    browser
        .wait_for(
            "the form's answer",
            "document.getElementById('form-status').innerText.startsWith('started job')",
            long,
        )
        .await
        .unwrap();
    let status = browser.eval("document.getElementById('form-status').innerText").await.unwrap();
    let form_id: i64 = status.as_str().unwrap().trim_start_matches("started job ").trim().parse().unwrap();
    until_job_succeeds(&base, form_id).await;
    let job = api("GET", &format!("{base}/api/v1/jobs/{form_id}"), None).await;
    assert_eq!(
        (job["url"].as_str(), job["scope"].as_str(), job["origin"].as_str()),
        (Some(manifest("v2").as_str()), Some("all_seed_peers"), Some("api"))
    );
    origin.settled_access_log().await.assert_copies_at_most(&second.blobs, 1.05);
    browser
        .wait_for("the form's job to show as done", &format!("[...document.querySelectorAll('#job-table tbody tr')].some(r => r.cells[0].innerText === '{form_id}' && r.innerText.includes('SUCCESS'))"), long)
        .await
        .unwrap();

    // Whatever a job's URL holds is shown as text.
    let hostile = "http://x.example/v2/a/manifests/1?<img src=x onerror=\"window.pwned=1\">";
    api("POST", &format!("{base}/api/v1/jobs"), Some(json!({"url": hostile}))).await;
    browser
        .wait_for("the hostile job", "document.querySelector('#job-table').innerText.includes('onerror')", long)
        .await
        .unwrap();
    let safe = browser.eval("window.pwned === undefined && !document.querySelector('#job-table img')").await.unwrap();
    assert_eq!(safe, json!(true), "a job's URL ran as HTML");

    browser.viewport(1280, 900, false).await.unwrap();
    browser.screenshot(&artifacts_dir().join("console.png")).await.unwrap();
    eprintln!("screenshots in {}", artifacts_dir().display());
    cluster.shutdown().await;
}
