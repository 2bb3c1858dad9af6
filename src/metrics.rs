//! Prometheus metrics (`GET /metrics` on the admin listener), with the `prometheus-client` crate.
//!
//! Labels stay low-cardinality: operation names, categories and status codes from the config and
//! the protocol, never account ids or paths.

use std::time::Duration;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

/// `operation` (or `free`) and HTTP `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Operation name, `free` for free routes, `none` when refused before routing.
    pub operation: String,
    /// HTTP status code.
    pub status: u16,
}

/// A usage category.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabels {
    /// Category name.
    pub category: String,
}

/// An operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// Operation name.
    pub operation: String,
}

/// Every metric the gateway exports.
pub struct Metrics {
    registry: Registry,
    /// Requests through the proxy path.
    pub requests: Family<RequestLabels, Counter>,
    /// Credits charged.
    pub credits_charged: Family<CategoryLabels, Counter>,
    /// Credits refunded.
    pub credits_refunded: Family<CategoryLabels, Counter>,
    /// 402 answers.
    pub payment_required: Family<OperationLabels, Counter>,
    /// Metered requests forwarded uncharged because the store was down (fail_open).
    pub fail_open: Counter,
    /// Time of one store step.
    pub store_seconds: Histogram,
    /// Time to an upstream's response head.
    pub upstream_seconds: Histogram,
    /// Jobs waiting in queues.
    pub jobs_queued: Gauge,
    /// Jobs running.
    pub jobs_running: Gauge,
    /// Undelivered events seen by the notifier at its last pass.
    pub outbox_depth: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("creditgate");
        let m = Metrics {
            requests: Family::default(),
            credits_charged: Family::default(),
            credits_refunded: Family::default(),
            payment_required: Family::default(),
            fail_open: Counter::default(),
            store_seconds: Histogram::new(exponential_buckets(0.000_05, 2.0, 16)),
            upstream_seconds: Histogram::new(exponential_buckets(0.000_5, 2.0, 20)),
            jobs_queued: Gauge::default(),
            jobs_running: Gauge::default(),
            outbox_depth: Gauge::default(),
            registry: Registry::default(),
        };
        registry.register("requests", "Requests through the proxy path", m.requests.clone());
        registry.register("credits_charged", "Credits charged", m.credits_charged.clone());
        registry.register("credits_refunded", "Credits refunded", m.credits_refunded.clone());
        registry.register("payment_required", "402 answers (no or insufficient credits)", m.payment_required.clone());
        registry.register(
            "fail_open",
            "Metered requests forwarded uncharged while the store was down",
            m.fail_open.clone(),
        );
        registry.register("store_seconds", "Duration of one store step", m.store_seconds.clone());
        registry.register("upstream_seconds", "Time to an upstream's response head", m.upstream_seconds.clone());
        registry.register("jobs_queued", "Queued jobs waiting for credits", m.jobs_queued.clone());
        registry.register("jobs_running", "Queued jobs running now", m.jobs_running.clone());
        registry.register("outbox_depth", "Undelivered events at the notifier's last pass", m.outbox_depth.clone());
        Metrics { registry, ..m }
    }
}

impl Metrics {
    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        prometheus_client::encoding::text::encode(&mut out, &self.registry).expect("writing to a String");
        out
    }

    /// Counts one proxied request.
    pub fn request(&self, operation: &str, status: u16) {
        self.requests.get_or_create(&RequestLabels { operation: operation.to_owned(), status }).inc();
    }

    /// Records a store step's duration.
    pub fn store_time(&self, d: Duration) {
        self.store_seconds.observe(d.as_secs_f64());
    }

    /// Records the time to an upstream's response head.
    pub fn upstream_time(&self, d: Duration) {
        self.upstream_seconds.observe(d.as_secs_f64());
    }
}
