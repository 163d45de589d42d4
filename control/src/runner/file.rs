//! A job of type `file` whose URL names no registry: the file is named by its URL and the
//! version its origin shows (`UrlVersion`), one seed fetches it from the origin into its P2P
//! cache, and the other peers in scope keep replicas of that entry from their peers. The job
//! records the file as its one blob once the seed says what it is (digest and length), and
//! ends `SUCCESS` when every peer in scope keeps it, whole and verified.

use std::collections::HashMap;
use std::time::Instant;

use damselfly_scheduler::Holding;

use super::{fail, peers_in_scope, reason, JobRun, Outcome, ASK_AGAIN, NO_PEER_GRACE, TICK};
use crate::job::{BlobProgress, Job, JobState, PeerResult, Scope};
use crate::resolve::{authorization, head_file};
use crate::store::{now_ms, StoreError};

impl JobRun {
    pub(super) async fn drive_file(&self, job: &Job, url: &str, deadline_ms: i64) -> Result<Outcome, StoreError> {
        let store = &self.runner.store;
        let cluster = &self.runner.cluster;
        let auth = authorization(&job.spec.headers);
        let head = tokio::select! {
            _ = self.shutdown.cancelled() => return Ok(Outcome::Released),
            head = head_file(&self.runner.upstream, url, auth.clone()) => head,
        };
        let head = match head {
            Ok(head) => head,
            Err(e) => return Ok(fail(&reason(&e))),
        };
        // The seed fetches without the job's credential unless it may have it: then the file
        // must be one anybody may read.
        if auth.is_some() && !self.runner.forward_credentials {
            let anonymous = tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(Outcome::Released),
                head = head_file(&self.runner.upstream, url, None) => head,
            };
            if !anonymous.is_ok_and(|h| h.version == head.version) {
                return Ok(fail(&format!(
                    "{} needs the job's Authorization, which reaches seeds only over a gRPC port that requires client certificates (--tls-client-ca)",
                    head.url
                )));
            }
        }
        let key = head.version.name(&head.url).key();
        let expires_ms = u64::try_from(now_ms()).unwrap_or(0).saturating_add(self.runner.file_ttl.as_millis() as u64);
        // As for registry blobs: the credential goes only to seeds over mutual TLS.
        let authorization = match self.runner.forward_credentials {
            true => auth.and_then(|v| v.to_str().ok().map(str::to_owned)).unwrap_or_default(),
            false => String::new(),
        };
        let task = head.version.task(&head.url, authorization, expires_ms);
        // Recorded once the seed named the file; a resumed job finds it recorded.
        let mut blob: Option<BlobProgress> = store.blobs(self.claim.id).await?.into_iter().next();
        let mut asked: HashMap<String, Instant> = HashMap::new();
        let mut no_peer_since: Option<Instant> = None;
        let mut targets = Vec::new();
        let mut tick = tokio::time::interval(TICK);
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(Outcome::Released),
                _ = tick.tick() => {}
            }
            let hosts = cluster.hosts();
            if targets.is_empty() {
                targets = peers_in_scope(&hosts, job.spec.scope, &job.spec.url);
            }
            // The seed that fetches from the origin: one in scope, else any (all_peers).
            let fetcher = targets.iter().chain(hosts.iter()).find(|h| h.seed && h.preheating).map(|h| h.id.clone());
            let (Some(fetcher), false) = (fetcher, targets.is_empty()) else {
                let since = *no_peer_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= NO_PEER_GRACE {
                    return Ok(fail(match job.spec.scope {
                        Scope::AllPeers => "no node with a seed among them is connected to this scheduler",
                        Scope::SingleSeedPeer | Scope::AllSeedPeers => "no seed peer is connected to this scheduler",
                    }));
                }
                continue;
            };
            no_peer_since = None;
            let due = |asked: &HashMap<String, Instant>, host: &str| {
                asked.get(host).is_none_or(|at| at.elapsed() >= ASK_AGAIN)
            };
            let Some((entry, keepers)) = cluster.cache_entry(&key) else {
                // The seed said why it could not, since it was asked.
                let failed = cluster.url_failure(&key).filter(|f| asked.get(&f.host).is_some_and(|at| f.at >= *at));
                if let Some(f) = failed {
                    return Ok(fail(&format!("seed {} could not fetch {}: {}", f.host, head.url, f.reason)));
                }
                if due(&asked, &fetcher) && cluster.ask_to_fetch_url(&fetcher, task.clone()) {
                    asked.insert(fetcher, Instant::now());
                }
                if now_ms() >= deadline_ms {
                    let why = format!(
                        "timed out after {} s: no seed fetched {} from its origin (see the seeds' logs)",
                        job.spec.timeout.as_secs(),
                        head.url
                    );
                    return Ok(Outcome::Done(JobState::Failure, why, Vec::new()));
                }
                continue;
            };
            let current = match &blob {
                Some(b) if b.digest != entry.digest || b.length != entry.length => {
                    return Ok(fail(&format!("{} changed at its origin while it was preheated", head.url)));
                }
                Some(b) => b.clone(),
                None => {
                    let b =
                        BlobProgress { digest: entry.digest.clone(), length: entry.length, ..BlobProgress::default() };
                    if !store.set_blobs(&self.claim, std::slice::from_ref(&b)).await? {
                        return Ok(Outcome::Left);
                    }
                    b
                }
            };
            let Holding { peers, piece_count, .. } = cluster.holding(&entry.digest, entry.length);
            let mut next = current.clone();
            next.wanted = targets.len() as u32;
            next.piece_count = piece_count;
            next.holders = targets.iter().filter(|t| keepers.contains(&t.id)).map(|t| t.id.clone()).collect();
            next.pieces_held = peers
                .iter()
                .filter(|(h, _, _)| targets.iter().any(|t| &t.id == h))
                .map(|(_, n, _)| u64::from(*n))
                .sum();
            if next != current {
                store.set_progress(&self.claim, &next).await?;
            }
            blob = Some(next.clone());
            if next.is_held() {
                let peers = targets.iter().map(|t| PeerResult {
                    host_id: t.id.clone(),
                    ip: t.ip.clone(),
                    description: String::new(),
                });
                return Ok(Outcome::Done(JobState::Success, String::new(), peers.collect()));
            }
            for t in targets.iter().filter(|t| !next.holders.contains(&t.id)) {
                if due(&asked, &t.id) && cluster.ask_to_keep(&t.id, entry.clone()) {
                    asked.insert(t.id.clone(), Instant::now());
                }
            }
            if now_ms() >= deadline_ms {
                let mut blobs = [next];
                return self.timed_out(job, &mut blobs, &targets).await;
            }
        }
    }
}
