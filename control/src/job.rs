//! What a preheat job is: what it asks for (`JobSpec`), where it stands (`JobState`), and what
//! it found (`BlobProgress`, `PeerResult`). The store keeps these; the API renders them in
//! each protocol's shape.

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// A job's number: what Harbor keeps as its task id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct JobId(pub i64);

impl fmt::Display for JobId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// The four states Harbor understands; it fails a job on any other.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum JobState {
    Pending,
    Running,
    Success,
    Failure,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Pending => "PENDING",
            JobState::Running => "RUNNING",
            JobState::Success => "SUCCESS",
            JobState::Failure => "FAILURE",
        }
    }

    pub fn parse(s: &str) -> Option<JobState> {
        [JobState::Pending, JobState::Running, JobState::Success, JobState::Failure]
            .into_iter()
            .find(|v| v.as_str() == s)
    }

    pub fn is_done(self) -> bool {
        matches!(self, JobState::Success | JobState::Failure)
    }
}

/// Which peers must hold every blob for the job to succeed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// One seed peer, picked by the image's URL.
    #[value(name = "single_seed_peer", alias = "single-seed-peer")]
    SingleSeedPeer,
    /// Every seed peer with a seed stream open.
    #[value(name = "all_seed_peers", alias = "all-seed-peers")]
    AllSeedPeers,
    /// Every node of the cluster.
    #[value(name = "all_peers", alias = "all-peers")]
    AllPeers,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::SingleSeedPeer => "single_seed_peer",
            Scope::AllSeedPeers => "all_seed_peers",
            Scope::AllPeers => "all_peers",
        }
    }

    /// Harbor's spelling; empty is its default, one seed peer.
    pub fn parse(s: &str) -> Option<Scope> {
        match s {
            "" | "single_seed_peer" => Some(Scope::SingleSeedPeer),
            "all_seed_peers" => Some(Scope::AllSeedPeers),
            "all_peers" => Some(Scope::AllPeers),
            _ => None,
        }
    }
}

/// What a job's URL names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Target {
    /// `…/v2/<repo>/manifests/<reference>`: an image, its index resolved to platforms.
    Image,
    /// A file: a registry blob (`…/v2/<repo>/blobs/<digest>`), fetched by digest like an
    /// image's; or any other URL, kept in the nodes' P2P caches under the URL and the version
    /// its origin shows (`runner/file.rs`).
    File,
}

impl Target {
    pub fn as_str(self) -> &'static str {
        match self {
            Target::Image => "image",
            Target::File => "file",
        }
    }

    pub fn parse(s: &str) -> Option<Target> {
        match s {
            "image" => Some(Target::Image),
            "file" => Some(Target::File),
            _ => None,
        }
    }
}

/// Who asked for a job; the legacy protocol's ids are the same numbers as strings.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Origin {
    /// Harbor ≥ 2.12 (`/oapi/v1/jobs`).
    OpenApi,
    /// Harbor 2.1–2.11 (`/preheats`).
    Legacy,
    /// A registry's push notification.
    Notification,
    /// The JSON API: `damselfly preheat` or the console's form.
    Api,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Origin::OpenApi => "oapi",
            Origin::Legacy => "legacy",
            Origin::Notification => "notification",
            Origin::Api => "api",
        }
    }

    pub fn parse(s: &str) -> Option<Origin> {
        [Origin::OpenApi, Origin::Legacy, Origin::Notification, Origin::Api].into_iter().find(|o| o.as_str() == s)
    }
}

/// What a job asks for, as the store keeps it.
#[derive(Clone, PartialEq, Eq)]
pub struct JobSpec {
    pub target: Target,
    pub url: String,
    /// Sent with every request to the registry (Harbor sends a pull token as `Authorization`).
    /// Kept in the store so another scheduler can run the job; never shown by the API.
    pub headers: BTreeMap<String, String>,
    pub scope: Scope,
    /// `os/arch[/variant]` of an index's manifests to preheat; empty: all of them.
    pub platforms: Vec<String>,
    /// Blobs asked of the peers at once.
    pub concurrency: u32,
    /// How long the job may run before it fails.
    pub timeout: Duration,
    pub origin: Origin,
}

/// Keeps the credentials a job carries out of logs and panic messages.
impl fmt::Debug for JobSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("JobSpec")
            .field("target", &self.target)
            .field("url", &self.url)
            .field("headers", &self.headers.keys().map(|k| (k, "<redacted>")).collect::<Vec<_>>())
            .field("scope", &self.scope)
            .field("platforms", &self.platforms)
            .field("concurrency", &self.concurrency)
            .field("timeout", &self.timeout)
            .field("origin", &self.origin)
            .finish()
    }
}

/// Of a request's headers, those a job keeps: `Authorization`, the one the registry is sent.
/// Nothing else is stored with the job.
pub fn registry_headers(headers: BTreeMap<String, String>) -> BTreeMap<String, String> {
    headers.into_iter().filter(|(k, _)| k.eq_ignore_ascii_case("authorization")).collect()
}

/// Blobs asked of the peers at once when the request leaves it at 0.
pub const DEFAULT_CONCURRENCY: u32 = 8;
/// Most blobs a request may have asked of the peers at once.
pub const MAX_CONCURRENCY: u32 = 64;
/// Most blobs one job may preheat; an image with more fails.
pub const MAX_BLOBS: usize = 5000;
/// A job's run time when the request leaves it at 0: Harbor stops polling after 30 minutes.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Longest run time a request may ask for.
pub const MAX_TIMEOUT: Duration = Duration::from_secs(24 * 3600);

/// One blob of a job and how far the peers in scope are with it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlobProgress {
    pub digest: String,
    pub length: u64,
    pub media_type: String,
    /// `os/arch[/variant]` of the manifest it belongs to; empty for a single-platform image.
    pub platform: String,
    /// Peers in scope that must hold it.
    pub wanted: u32,
    /// Peers in scope that hold it whole and verified.
    pub holders: Vec<String>,
    /// Pieces of the blob held, summed over the peers in scope, and pieces each must hold.
    pub pieces_held: u64,
    pub piece_count: u32,
    /// Why it is not held, once the job gave up on it.
    pub error: String,
}

impl BlobProgress {
    pub fn is_held(&self) -> bool {
        self.wanted > 0 && self.holders.len() as u32 >= self.wanted
    }
}

/// A job's blobs summed up, for lists.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub blobs: u64,
    /// Blobs every peer in scope holds.
    pub held: u64,
    /// Bytes the peers in scope must hold in all, and hold (of whole blobs).
    pub bytes: u64,
    pub bytes_held: u64,
    /// Blobs with a failure.
    pub failed: u64,
}

/// A peer in a finished job's result (Harbor's `success_tasks` and `failure_tasks`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PeerResult {
    pub host_id: String,
    pub ip: String,
    /// Empty for a peer that holds every blob.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
}

/// A job as read back from the store.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Job {
    pub id: JobId,
    pub spec: JobSpec,
    pub state: JobState,
    /// Unix milliseconds.
    pub created_ms: i64,
    pub updated_ms: i64,
    pub error: String,
    pub peers: Vec<PeerResult>,
    /// The runner that ran it last (`<scheduler's HTTP address>#<n>`), empty until claimed.
    pub runner: String,
    pub blobs: Vec<BlobProgress>,
}

impl Job {
    pub fn succeeded_peers(&self) -> impl Iterator<Item = &PeerResult> {
        self.peers.iter().filter(|p| p.description.is_empty())
    }

    pub fn failed_peers(&self) -> impl Iterator<Item = &PeerResult> {
        self.peers.iter().filter(|p| !p.description.is_empty())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_command_line_spells_scopes_as_harbor_does() {
        use clap::ValueEnum;
        for s in [Scope::SingleSeedPeer, Scope::AllSeedPeers, Scope::AllPeers] {
            assert_eq!(Scope::from_str(s.as_str(), false), Ok(s));
            assert_eq!(Scope::from_str(&s.as_str().replace('_', "-"), false), Ok(s));
        }
    }

    #[test]
    fn names_round_trip() {
        for s in [JobState::Pending, JobState::Running, JobState::Success, JobState::Failure] {
            assert_eq!(JobState::parse(s.as_str()), Some(s));
        }
        for s in [Scope::SingleSeedPeer, Scope::AllSeedPeers, Scope::AllPeers] {
            assert_eq!(Scope::parse(s.as_str()), Some(s));
        }
        for o in [Origin::OpenApi, Origin::Legacy, Origin::Notification, Origin::Api] {
            assert_eq!(Origin::parse(o.as_str()), Some(o));
        }
        assert_eq!(Scope::parse(""), Some(Scope::SingleSeedPeer));
        assert_eq!(Scope::parse("everyone"), None);
        assert_eq!(JobState::parse("STARTED"), None);
    }
}
