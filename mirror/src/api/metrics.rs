//! Metrics of the registry API: requests by route and status, and upstream requests by kind.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: &'static str,
    pub method: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    pub kind: &'static str,
}

#[derive(Default)]
pub struct ApiMetrics {
    pub requests: Family<RequestLabels, Counter>,
    pub origin_requests: Family<KindLabel, Counter>,
    pub access_checks: Family<KindLabel, Counter>,
}

impl ApiMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let m = ApiMetrics::default();
        registry.register(
            "damselfly_http_requests",
            "Registry API requests by route, method and status",
            m.requests.clone(),
        );
        registry.register(
            "damselfly_origin_requests",
            "Requests sent to origin registries, by kind",
            m.origin_requests.clone(),
        );
        registry.register(
            "damselfly_access_checks",
            "Authorization decisions for cached content, by outcome",
            m.access_checks.clone(),
        );
        m
    }

    pub fn origin(&self, kind: &'static str) {
        self.origin_requests.get_or_create(&KindLabel { kind }).inc();
    }

    pub fn access(&self, kind: &'static str) {
        self.access_checks.get_or_create(&KindLabel { kind }).inc();
    }
}
