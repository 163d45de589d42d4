//! Bearer tokens (distribution token auth): fetching from a realm, and a cache that shares one
//! fetch between concurrent requests for the same key.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde::Deserialize;
use url::Url;

use super::{RegistryCredential, UpstreamError};

/// The token spec's default lifetime when `expires_in` is absent.
const DEFAULT_LIFETIME: Duration = Duration::from_secs(60);
/// Longer lifetimes are not trusted blindly: a revoked token should not linger for days.
const MAX_LIFETIME: Duration = Duration::from_secs(3600);
/// Tokens are dropped this long before they expire so a request never races the expiry.
const MAX_MARGIN: Duration = Duration::from_secs(30);
/// Token responses are a few KiB of JWT; a hostile realm must not make us buffer gigabytes.
const MAX_BODY: usize = 1 << 20;
/// The realm is a small JSON endpoint, unlike registry bodies, so a whole-request bound is safe.
const FETCH_TIMEOUT: Duration = Duration::from_secs(30);
/// Above this many slots, idle expired entries are pruned when a new one is added.
const PRUNE_ABOVE: usize = 1024;

/// Who the token was issued to. Tokens for different identities must never be mixed up:
/// an anonymous request must not be answered with the daemon's credentials' token.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Identity {
    Anonymous,
    Configured { username: String },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TokenKey {
    pub host: String,
    pub scope: String,
    pub identity: Identity,
}

#[derive(Clone, Debug)]
pub(crate) struct Token {
    pub value: String,
    /// When to stop using the cached token; `None` means do not cache at all.
    pub cache_until: Option<Instant>,
}

impl Token {
    fn fresh(&self, now: Instant) -> bool {
        self.cache_until.is_some_and(|t| now < t)
    }
}

/// How long a token may be reused: its lifetime minus a margin of a quarter of it (capped),
/// or not at all when the lifetime is zero.
pub(crate) fn cache_until(now: Instant, expires_in: Option<u64>) -> Option<Instant> {
    let lifetime = expires_in.map_or(DEFAULT_LIFETIME, Duration::from_secs).min(MAX_LIFETIME);
    let usable = lifetime - (lifetime / 4).min(MAX_MARGIN);
    (!usable.is_zero()).then(|| now + usable)
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

pub(crate) fn parse_token_response(body: &[u8], now: Instant) -> Result<Token, String> {
    let resp: TokenResponse = serde_json::from_slice(body).map_err(|e| format!("bad token response: {e}"))?;
    let value = [resp.token, resp.access_token]
        .into_iter()
        .flatten()
        .find(|t| !t.is_empty())
        .ok_or_else(|| "token response has no token".to_owned())?;
    Ok(Token { value, cache_until: cache_until(now, resp.expires_in) })
}

/// `GET <realm>?service=…&scope=…`, with Basic credentials if given.
pub(crate) async fn fetch(
    client: &reqwest::Client,
    realm: &Url,
    service: Option<&str>,
    scope: &str,
    basic: Option<&RegistryCredential>,
) -> Result<Token, UpstreamError> {
    let mut url = realm.clone();
    {
        let mut q = url.query_pairs_mut();
        if let Some(service) = service {
            q.append_pair("service", service);
        }
        q.append_pair("scope", scope);
    }
    let mut req = client.get(url).timeout(FETCH_TIMEOUT);
    if let Some(c) = basic {
        req = req.basic_auth(&c.username, Some(&c.password));
    }
    let token_err =
        |reason: String, retryable: bool| UpstreamError::Token { realm: realm.to_string(), reason, retryable };
    let mut resp = req.send().await.map_err(|e| token_err(e.to_string(), true))?;
    let status = resp.status();
    tracing::debug!(realm = %realm, scope, with_credentials = basic.is_some(), %status, "token request");
    if status.is_client_error() {
        return Err(UpstreamError::TokenRejected { realm: realm.to_string(), status });
    }
    if !status.is_success() {
        return Err(token_err(format!("realm answered {status}"), status.is_server_error()));
    }
    let mut body = Vec::new();
    while let Some(chunk) = resp.chunk().await.map_err(|e| token_err(e.to_string(), true))? {
        if body.len() + chunk.len() > MAX_BODY {
            return Err(token_err("token response too large".into(), false));
        }
        body.extend_from_slice(&chunk);
    }
    parse_token_response(&body, Instant::now()).map_err(|e| token_err(e, false))
}

type Slot = Arc<tokio::sync::Mutex<Option<Token>>>;

/// Tokens per (registry, scope, identity). Each key has its own async lock, held while the token
/// is fetched, so concurrent requests for one key wait for that single fetch instead of each
/// asking the realm.
#[derive(Default)]
pub(crate) struct TokenCache {
    slots: Mutex<HashMap<TokenKey, Slot>>,
}

impl TokenCache {
    /// Returns a cached token unless it is expired or equal to `stale` (a token the registry
    /// just refused), else runs `fetch` and caches its result.
    pub(crate) async fn get_or_fetch<F, Fut>(
        &self,
        key: TokenKey,
        stale: Option<&str>,
        fetch: F,
    ) -> Result<String, UpstreamError>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<Token, UpstreamError>>,
    {
        let slot = self.slot(key);
        let mut cached = slot.lock().await;
        if let Some(t) = cached.as_ref() {
            if t.fresh(Instant::now()) && stale != Some(t.value.as_str()) {
                return Ok(t.value.clone());
            }
        }
        let token = fetch().await?;
        let value = token.value.clone();
        *cached = token.cache_until.is_some().then_some(token);
        Ok(value)
    }

    /// Returns the cached token without fetching, if it is still fresh.
    #[cfg(test)]
    pub(crate) fn peek(&self, key: &TokenKey) -> Option<String> {
        let slots = self.slots.lock().ok()?;
        let slot = slots.get(key)?.try_lock().ok()?;
        slot.as_ref().filter(|t| t.fresh(Instant::now())).map(|t| t.value.clone())
    }

    fn slot(&self, key: TokenKey) -> Slot {
        // A poisoned map only means another thread panicked mid-insert; the map itself is intact.
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        if slots.len() > PRUNE_ABOVE && !slots.contains_key(&key) {
            let now = Instant::now();
            slots.retain(|_, slot| match slot.try_lock() {
                Ok(t) => t.as_ref().is_some_and(|t| t.fresh(now)),
                Err(_) => true, // being fetched right now
            });
            // A realm that hands out long-lived tokens for every scope asked (and clients may
            // name any repository) must not grow the map for as long as they last: past twice
            // the threshold, only tokens being fetched stay; the rest are fetched again.
            if slots.len() > 2 * PRUNE_ABOVE {
                slots.retain(|_, slot| slot.try_lock().is_err());
            }
        }
        slots.entry(key).or_default().clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn expiry_rules() {
        let now = Instant::now();
        // Absent expires_in means 60 s; a quarter of it is the safety margin.
        assert_eq!(cache_until(now, None), Some(now + Duration::from_secs(45)));
        assert_eq!(cache_until(now, Some(300)), Some(now + Duration::from_secs(270)));
        assert_eq!(cache_until(now, Some(u64::MAX)), Some(now + Duration::from_secs(3570)));
        assert_eq!(cache_until(now, Some(0)), None);
        assert_eq!(cache_until(now, Some(2)), Some(now + Duration::from_millis(1500)));
    }

    #[test]
    fn token_response_fields() {
        let now = Instant::now();
        let t = parse_token_response(br#"{"token":"a","access_token":"b","expires_in":300}"#, now).unwrap();
        assert_eq!(t.value, "a");
        let t = parse_token_response(br#"{"access_token":"b"}"#, now).unwrap();
        assert_eq!(t.value, "b");
        assert_eq!(t.cache_until, Some(now + Duration::from_secs(45)));
        let t = parse_token_response(br#"{"token":"","access_token":"b"}"#, now).unwrap();
        assert_eq!(t.value, "b");
        assert!(parse_token_response(br#"{"expires_in":300}"#, now).is_err());
        assert!(parse_token_response(b"<html>", now).is_err());
    }

    fn key() -> TokenKey {
        TokenKey { host: "r".into(), scope: "repository:a:pull".into(), identity: Identity::Anonymous }
    }

    fn token(value: &str, secs: u64) -> Token {
        Token { value: value.into(), cache_until: cache_until(Instant::now(), Some(secs)) }
    }

    #[tokio::test]
    async fn the_token_cache_stays_bounded_whatever_scopes_clients_name() {
        let cache = TokenCache::default();
        for i in 0..5 * PRUNE_ABOVE {
            let k = TokenKey { scope: format!("repository:r{i}:pull"), ..key() };
            cache.get_or_fetch(k, None, || async { Ok(token("t", 3600)) }).await.expect("token");
        }
        let held = cache.slots.lock().map(|s| s.len()).unwrap_or(usize::MAX);
        assert!(held <= 2 * PRUNE_ABOVE + 1, "{held} tokens held");
    }

    #[tokio::test]
    async fn cache_reuses_and_refreshes_stale() {
        let cache = TokenCache::default();
        let calls = AtomicUsize::new(0);
        let fetch = |v: &'static str, secs| {
            calls.fetch_add(1, Ordering::SeqCst);
            async move { Ok(token(v, secs)) }
        };
        assert_eq!(cache.get_or_fetch(key(), None, || fetch("t1", 300)).await.unwrap(), "t1");
        assert_eq!(cache.get_or_fetch(key(), None, || fetch("t2", 300)).await.unwrap(), "t1");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
        // The registry refused t1: it is replaced, and a caller still holding t1 as stale after
        // someone else refreshed gets t2 without another fetch.
        assert_eq!(cache.get_or_fetch(key(), Some("t1"), || fetch("t2", 300)).await.unwrap(), "t2");
        assert_eq!(cache.get_or_fetch(key(), Some("t1"), || fetch("t3", 300)).await.unwrap(), "t2");
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        // Uncacheable tokens are fetched each time.
        let other = TokenKey { scope: "x".into(), ..key() };
        cache.get_or_fetch(other.clone(), None, || fetch("u", 0)).await.unwrap();
        assert_eq!(cache.peek(&other), None);
    }

    #[tokio::test]
    async fn concurrent_fetches_are_shared() {
        let cache = Arc::new(TokenCache::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let (cache, calls) = (cache.clone(), calls.clone());
                tokio::spawn(async move {
                    cache
                        .get_or_fetch(key(), None, || async move {
                            calls.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(20)).await;
                            Ok(token("shared", 300))
                        })
                        .await
                })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "shared");
        }
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
