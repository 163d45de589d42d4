//! Test harness for Damselfly's end-to-end tests.
//!
//! Every piece runs something real on loopback and cleans up on `Drop` (child processes are
//! killed and reaped, temporary directories removed):
//!
//! - [`Registry`]: a real `docker-registry` (CNCF distribution) on a free port, with an access-log
//!   parser ([`AccessLog`]) to count what actually reached the origin;
//! - [`Containerd`]: a private containerd whose `ctr` pulls through a `hosts.toml` mirror entry;
//! - [`skopeo_copy_via_mirror`]: skopeo with a `registries.conf` mirror;
//! - [`Dockerd`]: a private dockerd pulling through `HTTPS_PROXY`, and [`FakeHub`], the Docker
//!   Hub it falls back to;
//! - [`Nydusd`]: nydusd mounting a RAFS image ([`NydusImage`]) whose blob is in the registry;
//! - `scripts/cri-pull.py` through [`Containerd::cri_pull`]: kubelet's CRI pulls;
//! - [`Mirror`]: the daemon under test, in-process ([`Mirror::start`]) or as the `damselfly`
//!   binary ([`Mirror::spawn_binary`]);
//! - [`Scheduler`]: the scheduler, in-process, restartable on its address;
//! - [`cache_cli::cache`]: `damselfly cache` (the binary) against a daemon's data directory;
//! - [`Metrics`]: a Prometheus text scraper;
//! - [`FaultProxy`]: a TCP proxy that cuts or corrupts upstream responses;
//! - [`TokenAuthFront`]: Docker token auth in front of the (anonymous) real registry;
//! - [`Liar`]: a registry that says yes to everything, as an attacker runs one;
//! - [`BrokenDaemon`]: a daemon that answers 500 to everything.
//!
//! The one lesson (see the shared reference docs): every client silently falls back to the
//! origin when the mirror fails, so tests assert on the origin's access log and on the daemon's
//! metrics, never only on "the pull succeeded".

pub mod broken;
pub mod cache_cli;
pub mod chromium;
pub mod cluster;
pub mod containerd;
pub mod dockerd;
pub mod fault_proxy;
pub mod http;
pub mod hub;
pub mod liar;
pub mod metrics;
pub mod mirror;
pub mod nydus;
pub mod origin;
pub mod postgres;
pub mod registry;
pub mod scheduler;
pub mod skopeo;
pub mod tls;
pub mod token_auth;
pub mod util;

pub use broken::BrokenDaemon;
pub use cluster::Cluster;
pub use containerd::Containerd;
pub use dockerd::{non_loopback_ipv4, DockerTrust, Dockerd};
pub use fault_proxy::{FaultProxy, Times};
pub use http::{fetch, raw_http, BodyOutcome, Fetched, RawResponse};
pub use hub::FakeHub;
pub use liar::{Claim, Liar};
pub use metrics::Metrics;
pub use mirror::{Mirror, MirrorOpts, MirrorProcess};
pub use nydus::{fuse_missing, NydusImage, Nydusd};
pub use registry::{AccessEntry, AccessLog, Image, Registry};
pub use scheduler::Scheduler;
pub use skopeo::{skopeo, skopeo_copy_via_mirror};
pub use tls::TestCa;
pub use token_auth::TokenAuthFront;
pub use util::{
    covered_pieces, disk_usage, http_client, piece_size, pieces_total_bytes, poll_until, random_bytes, random_token,
    sha256_digest, walk_files, MIB,
};
