//! Self-tests of the harness against the real registry, containerd and skopeo, with no daemon
//! involved. If these fail, the daemon tests' assertions cannot be trusted: they check that the
//! access-log parser counts what clients really fetched, that a fresh containerd is really cold,
//! that skopeo really goes through the configured mirror, and that the fault proxy and the token
//! front do what they claim.

use damselfly_integration::token_auth::{PASSWORD, SERVICE, USER};
use damselfly_integration::{
    fetch, http_client, random_bytes, sha256_digest, skopeo_copy_via_mirror, BodyOutcome, Containerd, FaultProxy,
    Registry, Times, TokenAuthFront,
};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn access_log_counts_blob_get_body_bytes_and_requests() {
    let origin = Registry::start().await.unwrap();
    let data = random_bytes(3_000_000);
    let digest = origin.push_blob("selftest/log", data.clone()).await.unwrap();
    let client = http_client();
    let url = origin.blob_url("selftest/log", &digest);

    fetch(client.get(&url), false).await.unwrap().assert_blob(&digest, data.len() as u64);
    let range = fetch(client.get(&url).header("Range", "bytes=5-100"), true).await.unwrap();
    assert_eq!(range.status, 206);
    assert_eq!(range.body.as_deref(), Some(&data[5..=100]));
    client.head(&url).send().await.unwrap();

    let log = origin.settled_access_log().await;
    assert_eq!(log.blob_get_bytes(&digest), 3_000_000 + 96, "{:?}", log.matching(&digest));
    assert_eq!(log.count("GET", &format!("/blobs/{digest}")), 2);
    assert_eq!(log.count("HEAD", &format!("/blobs/{digest}")), 1);
    assert_eq!(log.count("PUT", "/blobs/uploads/"), 1);
    assert!((log.copies(&digest, data.len() as u64) - 1.000_032).abs() < 1e-6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctr_pulls_directly_and_a_fresh_containerd_root_is_cold() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("selftest/ctr", "v1", 2).await.unwrap();
    let ctd = Containerd::start().await.unwrap();
    ctd.write_hosts_toml_direct(&origin.host(), &origin.url()).unwrap();

    ctd.pull(&image.reference).await.unwrap();
    let log = origin.settled_access_log().await;
    for (digest, size) in &image.blobs {
        assert_eq!(log.copies(digest, *size), 1.0, "{digest}: {:?}", log.matching(digest));
    }
    assert_eq!(log.count("GET", &format!("/manifests/{}", image.manifest_digest)), 1);

    // Pulling again into the same root fetches nothing; a fresh root fetches everything again.
    ctd.pull(&image.reference).await.unwrap();
    let again = origin.settled_access_log().await;
    for (digest, size) in &image.blobs {
        assert_eq!(again.copies(digest, *size), 1.0, "same root refetched {digest}");
    }
    let fresh = ctd.fresh().await.unwrap();
    fresh.pull(&image.reference).await.unwrap();
    let log = origin.settled_access_log().await;
    for (digest, size) in &image.blobs {
        assert_eq!(log.copies(digest, *size), 2.0, "fresh root did not refetch {digest}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skopeo_copy_via_mirror_sends_every_request_to_the_mirror() {
    let origin = Registry::start().await.unwrap();
    let image = origin.push_image("selftest/skopeo", "v1", 1).await.unwrap();
    // A pass-through proxy stands in for the mirror: everything skopeo fetches must cross it.
    let stand_in = FaultProxy::start(origin.addr()).await.unwrap();
    let work = tempfile::tempdir().unwrap();
    let out = work.path().join("out");

    skopeo_copy_via_mirror(work.path(), &origin.host(), &stand_in.host(), &image.reference, &out).await.unwrap();

    let seen = stand_in.requests();
    assert!(
        seen.iter().any(|r| r.method == "GET" && r.target.contains("/manifests/v1")),
        "skopeo did not ask the mirror for the manifest: {seen:?}"
    );
    for (digest, size) in &image.blobs {
        assert!(seen.iter().any(|r| r.target.contains(digest.as_str())), "{digest} not fetched via mirror: {seen:?}");
        let file = std::fs::read(out.join(digest.trim_start_matches("sha256:"))).unwrap();
        assert_eq!(file.len() as u64, *size);
        assert_eq!(sha256_digest(&file), *digest);
    }
    let log = origin.settled_access_log().await;
    for (digest, size) in &image.blobs {
        assert_eq!(log.copies(digest, *size), 1.0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fault_proxy_cuts_once_and_corrupts_until_cleared() {
    let origin = Registry::start().await.unwrap();
    let data = random_bytes(3 << 20);
    let size = data.len() as u64;
    let digest = origin.push_blob("selftest/faults", data).await.unwrap();
    let proxy = FaultProxy::start(origin.addr()).await.unwrap();
    let url = format!("{}/v2/selftest/faults/blobs/{digest}", proxy.url());
    let client = http_client();

    proxy.cut_after(&digest, 1 << 20, Times::Once);
    let cut = fetch(client.get(&url), false).await.unwrap();
    assert!(matches!(cut.outcome, BodyOutcome::Broken(_)), "cut body ended cleanly: {cut:?}");
    assert_eq!(cut.received, 1 << 20);
    // A HEAD matches no rule, and the once-rule is used up.
    assert_eq!(client.head(&url).send().await.unwrap().status(), 200);
    fetch(client.get(&url), false).await.unwrap().assert_blob(&digest, size);

    proxy.corrupt(&digest, Times::Always);
    for _ in 0..2 {
        let wrong = fetch(client.get(&url), false).await.unwrap();
        assert!(wrong.is_clean_but_wrong(&digest, size), "corruption not applied: {wrong:?}");
        assert_eq!(wrong.received, size);
    }
    proxy.clear();
    fetch(client.get(&url), false).await.unwrap().assert_blob(&digest, size);
    assert_eq!(proxy.fired(&digest), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn token_auth_front_enforces_scopes_and_streams_authorised_requests() {
    let origin = Registry::start().await.unwrap();
    let public = random_bytes(1 << 20);
    let private = random_bytes(1 << 20);
    let public_digest = origin.push_blob("public/app", public.clone()).await.unwrap();
    let private_digest = origin.push_blob("private/app", private.clone()).await.unwrap();
    let front = TokenAuthFront::start(&origin.url()).await.unwrap();
    let client = http_client();
    let private_url = format!("{}/v2/private/app/blobs/{private_digest}", front.url());
    let public_url = format!("{}/v2/public/app/blobs/{public_digest}", front.url());

    // Like a real registry, the base endpoint challenges anonymous clients.
    let base = client.get(format!("{}/v2/", front.url())).send().await.unwrap();
    assert_eq!(base.status(), 401);
    assert_eq!(
        base.headers()["www-authenticate"],
        format!("Bearer realm=\"{}\",service=\"{SERVICE}\"", front.realm()).as_str()
    );

    let anon = client.get(&private_url).send().await.unwrap();
    assert_eq!(anon.status(), 401);
    assert_eq!(
        anon.headers()["www-authenticate"],
        format!("Bearer realm=\"{}\",service=\"{SERVICE}\",scope=\"repository:private/app:pull\"", front.realm())
            .as_str()
    );

    // Anonymous tokens work for public/ only.
    let anon_token = front.fetch_token("repository:private/app:pull", None).await.unwrap();
    let denied = client.get(&private_url).bearer_auth(&anon_token).send().await.unwrap();
    assert_eq!(denied.status(), 401);
    let anon_public = front.fetch_token("repository:public/app:pull", None).await.unwrap();
    fetch(client.get(&public_url).bearer_auth(&anon_public), false)
        .await
        .unwrap()
        .assert_blob(&public_digest, public.len() as u64);

    // Wrong credentials are refused at the realm; alice gets the private scope.
    assert!(front.fetch_token("repository:private/app:pull", Some((USER, "wrong"))).await.is_err());
    let alice = front.fetch_token("repository:private/app:pull", Some((USER, PASSWORD))).await.unwrap();
    fetch(client.get(&private_url).bearer_auth(&alice), false)
        .await
        .unwrap()
        .assert_blob(&private_digest, private.len() as u64);
    let head = client.head(&private_url).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(head.status(), 200);
    assert_eq!(head.headers()["content-length"], private.len().to_string().as_str());
    // A token for one repository does not open another.
    let other = client.get(public_url.replace("public/app", "private/other")).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(other.status(), 401);

    // The OAuth2 password grant (POST) that containerd uses.
    let form = format!(
        "grant_type=password&username={USER}&password={PASSWORD}&service={SERVICE}&scope=repository%3Aprivate%2Fapp%3Apull&client_id=test"
    );
    let posted = client
        .post(front.realm())
        .header("content-type", "application/x-www-form-urlencoded")
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(posted.status(), 200);
    let token: serde_json::Value = serde_json::from_slice(&posted.bytes().await.unwrap()).unwrap();
    let resp = client.get(&private_url).bearer_auth(token["access_token"].as_str().unwrap()).send().await.unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ctr_pulls_through_token_auth_front_directly() {
    // containerd's own token flow against the front: anonymous for public/, alice for private/.
    let origin = Registry::start().await.unwrap();
    let public = origin.push_image("public/app", "v1", 0).await.unwrap();
    let private = origin.push_image("private/app", "v1", 0).await.unwrap();
    let front = TokenAuthFront::start(&origin.url()).await.unwrap();
    let ctd = Containerd::start().await.unwrap();
    ctd.write_hosts_toml_direct(&front.host(), &front.url()).unwrap();

    ctd.pull(&format!("{}/public/app:v1", front.host())).await.unwrap();
    let refused = ctd.pull(&format!("{}/private/app:v1", front.host())).await;
    assert!(refused.is_err(), "anonymous pull of a private image succeeded");
    let private_ref = format!("{}/private/app:v1", front.host());
    ctd.ctr(&[
        "images",
        "pull",
        "--user",
        &format!("{USER}:{PASSWORD}"),
        "--hosts-dir",
        &ctd.hosts_dir().to_string_lossy(),
        &private_ref,
    ])
    .await
    .unwrap();

    let log = origin.settled_access_log().await;
    for (digest, size) in public.blobs.iter().chain(&private.blobs) {
        assert_eq!(log.copies(digest, *size), 1.0, "{digest}");
    }
    assert!(front.requests().iter().any(|r| r.path_and_query.starts_with("/token")));
}
