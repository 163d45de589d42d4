//! The scheduler's metrics, in a registry of its own.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

/// What a decision told a download.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DecisionKind {
    Parents,
    BackToSource,
    Wait,
    Quarantined,
    /// A seed was asked to fetch the task; the download waits for it.
    Seed,
}

impl DecisionKind {
    pub fn label(self) -> &'static str {
        match self {
            DecisionKind::Parents => "parents",
            DecisionKind::BackToSource => "back_to_source",
            DecisionKind::Wait => "wait",
            DecisionKind::Quarantined => "quarantined",
            DecisionKind::Seed => "seed",
        }
    }
}

/// Decision latency buckets: 10 µs to 100 ms, 1-2.5-5 a decade (the target is p99 ≤ 2 ms).
const BUCKETS: [f64; 13] = [1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 5e-2, 0.1];

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StreamLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct CallLabel {
    call: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabel {
    reason: &'static str,
}

pub struct Metrics {
    registry: Registry,
    hosts: Gauge,
    tasks: Gauge,
    peers: Gauge,
    seeds: Gauge,
    decisions: Family<KindLabel, Counter>,
    decision_seconds: Histogram,
    seed_refusals: Family<CallLabel, Counter>,
    member_refusals: Family<ReasonLabel, Counter>,
    poison_reports: Counter,
    streams: Family<StreamLabel, Gauge>,
}

/// Counts one open stream while it lives (see `Metrics::stream_open`).
pub(crate) struct OpenStream(Gauge);

impl Drop for OpenStream {
    fn drop(&mut self) {
        self.0.dec();
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::default();
        let (hosts, tasks, peers, seeds) = (Gauge::default(), Gauge::default(), Gauge::default(), Gauge::default());
        let decisions = Family::<KindLabel, Counter>::default();
        let seed_refusals = Family::<CallLabel, Counter>::default();
        let member_refusals = Family::<ReasonLabel, Counter>::default();
        let poison_reports = Counter::default();
        let streams = Family::<StreamLabel, Gauge>::default();
        let decision_seconds = Histogram::new(BUCKETS);
        registry.register("damselfly_scheduler_hosts", "Hosts the scheduler knows", hosts.clone());
        registry.register("damselfly_scheduler_tasks", "Tasks the scheduler knows", tasks.clone());
        registry.register("damselfly_scheduler_peers", "Peers (host, task) the scheduler knows", peers.clone());
        registry.register("damselfly_scheduler_seeds", "Seed hosts taking seed tasks", seeds.clone());
        registry.register(
            "damselfly_scheduler_seed_refusals",
            "Calls refused the seed role or acting for a seed, for want of a seed certificate, by call",
            seed_refusals.clone(),
        );
        registry.register(
            "damselfly_scheduler_member_refusals",
            "Calls refused for want of a valid membership proof, or acting for a host another node owns, by reason",
            member_refusals.clone(),
        );
        registry.register(
            "damselfly_scheduler_poison_reports",
            "Downloads whose content, checked against the pinned digests, failed its digest (the pins were dropped)",
            poison_reports.clone(),
        );
        registry.register("damselfly_scheduler_decisions", "Decisions sent to downloads, by kind", decisions.clone());
        registry.register(
            "damselfly_scheduler_streams",
            "Open streams carrying downloads: `session` (a host's, for all its downloads) or `download` (one each)",
            streams.clone(),
        );
        registry.register_with_unit(
            "damselfly_scheduler_decision_duration",
            "Time to make one decision",
            Unit::Seconds,
            decision_seconds.clone(),
        );
        Metrics {
            registry,
            hosts,
            tasks,
            peers,
            seeds,
            decisions,
            decision_seconds,
            seed_refusals,
            member_refusals,
            poison_reports,
            streams,
        }
    }

    /// The registry in the OpenMetrics text format.
    pub fn encode(&self) -> Result<String, std::fmt::Error> {
        let mut out = String::new();
        self.encode_families(&mut out)?;
        prometheus_client::encoding::text::encode_eof(&mut out)?;
        Ok(out)
    }

    /// The metric families alone, without the closing `# EOF`, for a process that serves them
    /// beside its own (a node daemon running a scheduler in-process).
    pub fn encode_families(&self, out: &mut String) -> Result<(), std::fmt::Error> {
        prometheus_client::encoding::text::encode_registry(out, &self.registry)
    }

    pub(crate) fn decision(&self, kind: DecisionKind, took: Duration) {
        self.decisions.get_or_create(&KindLabel { kind: kind.label() }).inc();
        self.decision_seconds.observe(took.as_secs_f64());
    }

    pub(crate) fn sizes(&self, hosts: usize, tasks: usize, peers: usize, seeds: usize) {
        let g = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        self.hosts.set(g(hosts));
        self.tasks.set(g(tasks));
        self.peers.set(g(peers));
        self.seeds.set(g(seeds));
    }

    /// Counts a stream of `kind` (`session` or `download`) open until the guard drops.
    pub(crate) fn stream_open(&self, kind: &'static str) -> OpenStream {
        let gauge = self.streams.get_or_create(&StreamLabel { kind }).clone();
        gauge.inc();
        OpenStream(gauge)
    }

    pub(crate) fn seed_refused(&self, call: &'static str) {
        self.seed_refusals.get_or_create(&CallLabel { call }).inc();
    }

    /// `reason`: `missing`, `malformed`, `stale`, `bad_proof`, `other_host` or `not_owner`.
    pub(crate) fn member_refused(&self, reason: &'static str) {
        self.member_refusals.get_or_create(&ReasonLabel { reason }).inc();
    }

    pub(crate) fn poison_reported(&self) {
        self.poison_reports.inc();
    }

    /// Decisions of one kind so far (for tests and benchmarks).
    pub fn decisions(&self, kind: DecisionKind) -> u64 {
        self.decisions.get_or_create(&KindLabel { kind: kind.label() }).get()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_every_metric_with_its_suffix() {
        let m = Metrics::new();
        m.sizes(3, 2, 1, 1);
        m.seed_refused("announce_host");
        m.member_refused("bad_proof");
        m.decision(DecisionKind::Seed, Duration::from_micros(15));
        let (_open, closed) = (m.stream_open("session"), m.stream_open("session"));
        drop(closed);
        let text = m.encode().expect("encode");
        for line in [
            "damselfly_scheduler_hosts 3",
            "damselfly_scheduler_tasks 2",
            "damselfly_scheduler_peers 1",
            "damselfly_scheduler_seeds 1",
            "damselfly_scheduler_seed_refusals_total{call=\"announce_host\"} 1",
            "damselfly_scheduler_member_refusals_total{reason=\"bad_proof\"} 1",
            "damselfly_scheduler_decisions_total{kind=\"seed\"} 1",
            "damselfly_scheduler_streams{kind=\"session\"} 1",
            "damselfly_scheduler_decision_duration_seconds_bucket{le=\"0.1\"} 1",
            "damselfly_scheduler_decision_duration_seconds_bucket{le=\"0.00001\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from\n{text}");
        }
        assert_eq!(m.decisions(DecisionKind::Seed), 1);
    }
}
