//! Upstream token auth (Docker token flow) through the daemon. A real anonymous registry sits
//! behind `TokenAuthFront`: `public/...` pulls anonymously, `private/...` needs alice:secret.
//! Images are pushed straight to the real registry; the daemon and the clients only ever see
//! the front.

use damselfly_integration::token_auth::{PASSWORD, SERVICE, USER};
use damselfly_integration::{fetch, http_client, Containerd, Image, Mirror, MirrorOpts, Registry, TokenAuthFront};
use reqwest::StatusCode;

const MANIFEST_ACCEPT: &str = "application/vnd.oci.image.manifest.v1+json";

struct Setup {
    origin: Registry,
    front: TokenAuthFront,
    public: Image,
    private: Image,
}

async fn setup() -> Setup {
    let origin = Registry::start().await.unwrap();
    let public = origin.push_image("public/app", "v1", 2).await.unwrap();
    let private = origin.push_image("private/app", "v1", 2).await.unwrap();
    let front = TokenAuthFront::start(&origin.url()).await.unwrap();
    Setup { origin, front, public, private }
}

impl Setup {
    /// A daemon whose upstream is the front (plain HTTP).
    fn mirror_opts(&self) -> MirrorOpts {
        MirrorOpts::new(&self.front.url())
    }

    fn blob_url(&self, mirror: &Mirror, repo: &str, digest: &str) -> String {
        mirror.blob_url_ns(repo, digest, &self.front.host())
    }

    fn manifest_url(&self, mirror: &Mirror, repo: &str, reference: &str) -> String {
        format!("{}/v2/{repo}/manifests/{reference}?ns={}", mirror.url(), self.front.host())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn anonymous_containerd_pulls_of_public_image_through_mirror_fetch_origin_once() {
    let s = setup().await;
    let mirror = Mirror::start(s.mirror_opts()).await.unwrap();
    let first = Containerd::start().await.unwrap();
    first.write_hosts_toml(&s.front.host(), &s.front.url(), &mirror.url()).unwrap();
    let reference = format!("{}/public/app:v1", s.front.host());
    first.pull(&reference).await.unwrap();
    let second = first.fresh().await.unwrap();
    second.pull(&reference).await.unwrap();

    // The daemon did the anonymous token flow itself and served the second node from cache.
    let log = s.origin.settled_access_log().await;
    log.assert_copies_at_most(&s.public.blobs, 1.05);
    let metrics = mirror.metrics().await.unwrap();
    let from_cache = metrics.sum("damselfly_download_bytes_total", &[("source", "cache")]);
    assert!(from_cache > 0.0, "no bytes served from cache: {:#?}", metrics.with_prefix("damselfly_"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_with_registry_auth_serves_private_image_to_plain_http_client() {
    let s = setup().await;
    let mirror = Mirror::start(s.mirror_opts().registry_auth(&s.front.host(), USER, PASSWORD)).await.unwrap();
    let client = http_client();

    // Credentials configured on the daemon act for every client of that daemon.
    let manifest =
        fetch(client.get(s.manifest_url(&mirror, "private/app", "v1")).header("Accept", MANIFEST_ACCEPT), false)
            .await
            .unwrap();
    manifest.assert_blob(&s.private.manifest_digest, s.private.manifest_size);
    for (digest, size) in &s.private.blobs {
        fetch(client.get(s.blob_url(&mirror, "private/app", digest)), false).await.unwrap().assert_blob(digest, *size);
    }
    let log = s.origin.settled_access_log().await;
    for (digest, size) in &s.private.blobs {
        assert!(log.copies(digest, *size) >= 1.0, "{digest} did not come from the origin: {:#?}", log.matching(digest));
    }
}

/// Pulls `realm`, `service` and `scope` out of a `Bearer ...` challenge.
fn challenge_params(header: &str) -> Vec<(String, String)> {
    let rest = header.strip_prefix("Bearer ").unwrap_or_else(|| panic!("not a Bearer challenge: {header}"));
    rest.split(',')
        .filter_map(|kv| kv.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().trim_matches('"').to_owned()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_without_credentials_relays_challenge_and_client_token_then_succeeds() {
    let s = setup().await;
    let mirror = Mirror::start(s.mirror_opts()).await.unwrap();
    let client = http_client();
    let (digest, size) = s.private.largest_blob();
    let blob_url = s.blob_url(&mirror, "private/app", &digest);

    let denied = client.get(&blob_url).send().await.unwrap();
    assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
    let challenge = denied.headers().get("www-authenticate").expect("challenge relayed").to_str().unwrap().to_owned();
    let params = challenge_params(&challenge);
    let param = |k: &str| params.iter().find(|(pk, _)| pk == k).map(|(_, v)| v.as_str());
    assert_eq!(param("realm"), Some(s.front.realm()), "{challenge}");
    assert_eq!(param("service"), Some(SERVICE), "{challenge}");
    let scope = param("scope").unwrap_or("repository:private/app:pull").to_owned();

    // The client does the token dance with the realm itself and retries through the mirror.
    let token = s.front.fetch_token(&scope, Some((USER, PASSWORD))).await.unwrap();
    fetch(client.get(&blob_url).bearer_auth(&token), false).await.unwrap().assert_blob(&digest, size);

    let manifest_url = s.manifest_url(&mirror, "private/app", &s.private.manifest_digest);
    let denied = client.get(&manifest_url).header("Accept", MANIFEST_ACCEPT).send().await.unwrap();
    assert_eq!(denied.status(), StatusCode::UNAUTHORIZED);
    assert!(denied.headers().contains_key("www-authenticate"));
    fetch(client.get(&manifest_url).header("Accept", MANIFEST_ACCEPT).bearer_auth(&token), false)
        .await
        .unwrap()
        .assert_blob(&s.private.manifest_digest, s.private.manifest_size);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cached_private_blob_is_never_served_to_unauthorised_clients() {
    let s = setup().await;
    let mirror = Mirror::start(s.mirror_opts()).await.unwrap();
    let client = http_client();
    let (digest, size) = s.private.largest_blob();
    let private_url = s.blob_url(&mirror, "private/app", &digest);

    // An authorised client puts the blob in the cache.
    let token = s.front.fetch_token("repository:private/app:pull", Some((USER, PASSWORD))).await.unwrap();
    fetch(client.get(&private_url).bearer_auth(&token), false).await.unwrap().assert_blob(&digest, size);

    // The digest is a content address, not a permission.
    let anonymous_token = s.front.fetch_token("repository:private/app:pull", None).await.unwrap();
    let public_token = s.front.fetch_token("repository:public/app:pull", None).await.unwrap();
    let under_public_name = s.blob_url(&mirror, "public/app", &digest);
    let attempts = [
        ("no credentials", client.get(&private_url)),
        ("no credentials, HEAD", client.head(&private_url)),
        ("no credentials, range", client.get(&private_url).header("Range", "bytes=0-1023")),
        ("bogus bearer token", client.get(&private_url).bearer_auth("not-a-token")),
        ("wrong basic password", client.get(&private_url).basic_auth(USER, Some("wrong"))),
        ("anonymous token without the scope", client.get(&private_url).bearer_auth(&anonymous_token)),
        ("under the public repository's name", client.get(&under_public_name)),
        ("under the public name, public token", client.get(&under_public_name).bearer_auth(&public_token)),
    ];
    for (what, request) in attempts {
        let resp = fetch(request, false).await.unwrap();
        assert!(
            matches!(resp.status.as_u16(), 401 | 403 | 404),
            "{what}: got {} ({} body bytes) for a cached private blob",
            resp.status,
            resp.received
        );
    }
}
