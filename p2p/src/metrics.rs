//! Metrics of the piece store and its fetches, registered into the caller's registry.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use crate::source::ByteSource;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabel {
    pub source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: &'static str,
}

#[derive(Default)]
pub struct Metrics {
    /// Bytes sent to clients, by where they came from.
    pub sent_bytes: Family<SourceLabel, Counter>,
    /// Bytes received from sources (the origin) into the store.
    pub fetched_bytes: Family<SourceLabel, Counter>,
    pub cache_bytes: Gauge,
    pub cache_tasks: Gauge,
    pub verify_failures: Counter,
    pub piece_failures: Family<ReasonLabel, Counter>,
    pub evictions: Counter,
    pub passthrough: Counter,
    pub fetch_retries: Counter,
}

impl Metrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = Metrics::default();
        registry.register(
            "damselfly_download_bytes",
            "Bytes sent to clients, by where they came from",
            m.sent_bytes.clone(),
        );
        registry.register(
            "damselfly_fetched_bytes",
            "Bytes received into the store, by source",
            m.fetched_bytes.clone(),
        );
        registry.register("damselfly_cache_bytes", "Bytes reserved by cached tasks", m.cache_bytes.clone());
        registry.register("damselfly_cache_tasks", "Tasks in the cache", m.cache_tasks.clone());
        registry.register(
            "damselfly_verify_failures",
            "Tasks whose content did not match their digest",
            m.verify_failures.clone(),
        );
        registry.register("damselfly_piece_failures", "Pieces that failed, by reason", m.piece_failures.clone());
        registry.register("damselfly_cache_evictions", "Tasks evicted to stay under the quota", m.evictions.clone());
        registry.register(
            "damselfly_passthrough",
            "Downloads streamed without caching (quota or disk full)",
            m.passthrough.clone(),
        );
        registry.register(
            "damselfly_fetch_retries",
            "Source requests retried after a failure",
            m.fetch_retries.clone(),
        );
        m
    }

    /// `n` bytes from `from` went to a client.
    pub fn sent(&self, from: ByteSource, n: u64) {
        self.sent_bytes.get_or_create(&SourceLabel { source: from.label() }).inc_by(n);
    }

    /// Bytes sent to clients so far from `from`.
    pub fn sent_from(&self, from: ByteSource) -> u64 {
        self.sent_bytes.get_or_create(&SourceLabel { source: from.label() }).get()
    }

    /// `n` bytes from `from` came into the store.
    pub fn fetched(&self, from: ByteSource, n: u64) {
        self.fetched_bytes.get_or_create(&SourceLabel { source: from.label() }).inc_by(n);
    }

    pub fn piece_failed(&self, reason: &'static str) {
        self.piece_failures.get_or_create(&ReasonLabel { reason }).inc();
    }
}
