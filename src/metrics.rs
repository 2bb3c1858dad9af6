//! Prometheus metrics (`GET /metrics` on the admin listener), with the `prometheus-client` crate.
//!
//! Labels stay low-cardinality: operation names, categories and status codes from the config and
//! the protocol, never account ids or paths. Recording is lock-free on the request path: label
//! values are shared `Arc<str>`s (no allocation) and histograms are plain atomics
//! ([`AtomicHistogram`]) — prometheus-client's own histogram takes a mutex on every observation.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::encoding::{EncodeMetric, MetricEncoder, NoLabelSet};
use prometheus_client::metrics::{MetricType, TypedMetric};

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// `operation` (or `free`) and HTTP `status`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    /// Operation name, `free` for free routes, `none` when refused before routing.
    pub operation: Arc<str>,
    /// HTTP status code.
    pub status: u16,
}

/// A usage category.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CategoryLabels {
    /// Category name.
    pub category: Arc<str>,
}

/// An operation.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabels {
    /// Operation name.
    pub operation: Arc<str>,
}

/// A bounded in-memory table (rate limiters, key cache).
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabels {
    /// `accounts`, `clients`, `refused_clients`, `known_keys` or `unknown_keys`.
    pub table: &'static str,
}

/// Metrics instances in this process, numbered (tests run several gateways): the counters kept
/// per thread ([`Metrics::request`]) belong to one of them.
static METRICS_IDS: AtomicU64 = AtomicU64::new(0);

/// Every metric the gateway exports.
pub struct Metrics {
    id: u64,
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
    /// Metered requests whose client hung up after the request reached the backend: the charge
    /// stands, the backend call is cancelled.
    pub client_gone_after_delivery: Counter,
    /// Client connections open now (both listeners).
    pub connections_open: Gauge,
    /// Live tokio tasks, as of the last scrape.
    pub tasks: Gauge,
    /// 1 while the store answers, 0 while it is known to be down (steps fail at once), as of
    /// the last scrape.
    pub store_up: Gauge,
    /// Times the store was marked down, as of the last scrape.
    pub store_downs: Gauge,
    /// Connections closed because a request head did not arrive in time.
    pub connections_header_timeout: Counter,
    /// Keep-alive connections closed after `server.idle_timeout_ms` without a request.
    pub connections_idle_timeout: Counter,
    /// Connections closed because the client stopped taking its answer.
    pub connections_write_timeout: Counter,
    /// Time of one store step.
    pub store_seconds: AtomicHistogram,
    /// Time to an upstream's response head.
    pub upstream_seconds: AtomicHistogram,
    /// Jobs waiting in queues.
    pub jobs_queued: Gauge,
    /// Jobs running.
    pub jobs_running: Gauge,
    /// Undelivered events seen by the notifier at its last pass.
    pub outbox_depth: Gauge,
    /// Undelivered events dropped because an account's outbox was full.
    pub outbox_dropped: Counter,
    /// Undelivered events dropped because they reached `notifications.event_ttl_hours`.
    pub events_expired: Counter,
    /// Ledger entries exported (usage export), counted per delivered batch.
    pub exported_entries: Counter,
    /// Export batches a receiver did not take (retried).
    pub export_failures: Counter,
    /// Ledger entries not yet exported, as the exporter last saw each account (kept untrimmed).
    pub export_pending: Gauge,
    /// Entries of the rate limiters and the key cache after their last cleanup.
    pub rate_limit_entries: Family<TableLabels, Gauge>,
    /// The upstream backends of the config in force (requests, errors, ejections, in flight,
    /// health, latency per backend).
    pub backends: Arc<crate::proxy::pool::BackendSet>,
}

impl Default for Metrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("creditgate");
        let m = Metrics {
            id: METRICS_IDS.fetch_add(1, Ordering::Relaxed),
            requests: Family::default(),
            credits_charged: Family::default(),
            credits_refunded: Family::default(),
            payment_required: Family::default(),
            fail_open: Counter::default(),
            client_gone_after_delivery: Counter::default(),
            connections_open: Gauge::default(),
            tasks: Gauge::default(),
            store_up: Gauge::default(),
            store_downs: Gauge::default(),
            connections_header_timeout: Counter::default(),
            connections_idle_timeout: Counter::default(),
            connections_write_timeout: Counter::default(),
            store_seconds: AtomicHistogram::exponential(0.000_05, 2.0, 16),
            upstream_seconds: AtomicHistogram::exponential(0.000_5, 2.0, 20),
            jobs_queued: Gauge::default(),
            jobs_running: Gauge::default(),
            outbox_depth: Gauge::default(),
            outbox_dropped: Counter::default(),
            events_expired: Counter::default(),
            exported_entries: Counter::default(),
            export_failures: Counter::default(),
            export_pending: Gauge::default(),
            rate_limit_entries: Family::default(),
            backends: Arc::default(),
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
        registry.register(
            "client_gone_after_delivery",
            "Metered requests whose client hung up after the backend got them (charge kept, backend call cancelled)",
            m.client_gone_after_delivery.clone(),
        );
        registry.register("connections_open", "Client connections open now", m.connections_open.clone());
        registry.register("tasks", "Live tokio tasks, as of this scrape", m.tasks.clone());
        registry.register(
            "store_up",
            "1 while the store answers, 0 while it is known to be down and metered steps fail at once",
            m.store_up.clone(),
        );
        registry.register("store_downs", "Times the store was found down since start", m.store_downs.clone());
        registry.register(
            "connections_header_timeout",
            "Connections closed because a request head did not arrive within server.header_read_timeout_ms",
            m.connections_header_timeout.clone(),
        );
        registry.register(
            "connections_idle_timeout",
            "Keep-alive connections closed after server.idle_timeout_ms without a request",
            m.connections_idle_timeout.clone(),
        );
        registry.register(
            "connections_write_timeout",
            "Connections closed because the client took no answer bytes within server.write_timeout_ms",
            m.connections_write_timeout.clone(),
        );
        registry.register("store_seconds", "Duration of one store step", m.store_seconds.clone());
        registry.register("upstream_seconds", "Time to an upstream's response head", m.upstream_seconds.clone());
        registry.register("jobs_queued", "Queued jobs waiting for credits", m.jobs_queued.clone());
        registry.register("jobs_running", "Queued jobs running now", m.jobs_running.clone());
        registry.register("outbox_depth", "Undelivered events at the notifier's last pass", m.outbox_depth.clone());
        registry.register("exported_entries", "Ledger entries delivered by usage export", m.exported_entries.clone());
        registry.register("export_failures", "Usage export batches not taken (retried)", m.export_failures.clone());
        registry.register(
            "export_pending_entries",
            "Ledger entries not yet exported (history is never trimmed past them)",
            m.export_pending.clone(),
        );
        registry.register(
            "outbox_dropped",
            "Undelivered events dropped because an account's outbox was full",
            m.outbox_dropped.clone(),
        );
        registry.register(
            "events_expired",
            "Undelivered events dropped because they reached notifications.event_ttl_hours",
            m.events_expired.clone(),
        );
        registry.register(
            "rate_limit_entries",
            "Entries of the rate limiters and the API-key cache after their last cleanup",
            m.rate_limit_entries.clone(),
        );
        registry.register_collector(Box::new(m.backends.clone()));
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
    pub fn request(&self, operation: &Arc<str>, status: u16) {
        // The last counter is kept per thread: most requests in a row have the same labels, and
        // a hit costs a pointer compare instead of hashing the labels and a read lock on the
        // family. (Labels are compared by the operation's `Arc`: another `Arc` with the same
        // name just misses and finds the same counter in the family.)
        type Kept = Option<(u64, Arc<str>, u16, Counter)>;
        thread_local! {
            static LAST: std::cell::RefCell<Kept> = const { std::cell::RefCell::new(None) };
        }
        LAST.with_borrow_mut(|last| {
            if let Some((id, op, st, counter)) = last
                && *id == self.id
                && Arc::ptr_eq(op, operation)
                && *st == status
            {
                counter.inc();
                return;
            }
            let counter = self.requests.get_or_create(&RequestLabels { operation: operation.clone(), status }).clone();
            counter.inc();
            *last = Some((self.id, operation.clone(), status, counter));
        });
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

/// A histogram of atomics: observing is a handful of relaxed atomic adds, no lock. Clones share
/// the counts (one registered, one recorded into).
#[derive(Debug, Clone)]
pub struct AtomicHistogram(Arc<Buckets>);

#[derive(Debug)]
struct Buckets {
    bounds: Vec<f64>,
    /// Per-bucket counts (not cumulative); the last one is +Inf.
    counts: Vec<AtomicU64>,
    /// Sum in nanoseconds-like fixed point (value × 1e9), exact enough for seconds.
    sum_nanos: AtomicU64,
}

impl AtomicHistogram {
    /// `n` buckets starting at `start`, each `factor` times the previous.
    pub fn exponential(start: f64, factor: f64, n: usize) -> Self {
        let bounds: Vec<f64> = (0..n).map(|i| start * factor.powi(i as i32)).collect();
        let counts = (0..=n).map(|_| AtomicU64::new(0)).collect();
        AtomicHistogram(Arc::new(Buckets { bounds, counts, sum_nanos: AtomicU64::new(0) }))
    }

    /// Records one value.
    pub fn observe(&self, v: f64) {
        let h = &*self.0;
        let i = h.bounds.iter().position(|b| v <= *b).unwrap_or(h.bounds.len());
        h.counts[i].fetch_add(1, Ordering::Relaxed);
        h.sum_nanos.fetch_add((v * 1e9) as u64, Ordering::Relaxed);
    }
}

impl TypedMetric for AtomicHistogram {
    const TYPE: MetricType = MetricType::Histogram;
}

impl EncodeMetric for AtomicHistogram {
    fn encode(&self, mut encoder: MetricEncoder) -> Result<(), std::fmt::Error> {
        // encode_histogram accumulates the buckets itself: hand it per-bucket counts.
        let h = &*self.0;
        let mut count = 0;
        let mut buckets = Vec::with_capacity(h.counts.len());
        for (i, c) in h.counts.iter().enumerate() {
            let n = c.load(Ordering::Relaxed);
            count += n;
            buckets.push((h.bounds.get(i).copied().unwrap_or(f64::INFINITY), n));
        }
        let sum = h.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9;
        encoder.encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
    }

    fn metric_type(&self) -> MetricType {
        MetricType::Histogram
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_renders_cumulative_buckets() {
        let m = Metrics::default();
        m.store_time(Duration::from_micros(40));
        m.store_time(Duration::from_micros(120));
        m.store_time(Duration::from_secs(10));
        m.request(&Arc::from("ai_chat"), 200);
        let text = m.render();
        assert!(text.contains("creditgate_store_seconds_count 3"), "{text}");
        assert!(
            text.contains("creditgate_store_seconds_bucket{le=\"5e-5\"} 1") || text.contains("le=\"0.00005\"} 1"),
            "{text}"
        );
        assert!(text.lines().any(|l| l == "creditgate_store_seconds_bucket{le=\"+Inf\"} 3"), "{text}");
        assert!(text.lines().any(|l| l.starts_with("creditgate_store_seconds_bucket{le=\"0.0001\"} 1")), "{text}");
        assert!(text.lines().any(|l| l.starts_with("creditgate_store_seconds_bucket{le=\"0.0002\"} 2")), "{text}");
        assert!(text.contains("creditgate_requests_total{operation=\"ai_chat\",status=\"200\"} 1"), "{text}");
    }

    #[test]
    fn request_counts_land_in_their_own_metrics_and_labels() {
        let (a, b) = (Metrics::default(), Metrics::default());
        let (chat, free) = (Arc::<str>::from("ai_chat"), Arc::<str>::from("free"));
        for (m, op, status) in
            [(&a, &chat, 200), (&a, &chat, 200), (&b, &chat, 200), (&a, &chat, 402), (&a, &free, 200)]
        {
            m.request(op, status);
        }
        a.request(&Arc::from("ai_chat"), 200);
        let count = |m: &Metrics, labels: &str| {
            let text = m.render();
            let line = format!("creditgate_requests_total{{{labels}}} ");
            text.lines().find_map(|l| l.strip_prefix(&line).map(str::to_owned)).unwrap_or_default()
        };
        assert_eq!(count(&a, "operation=\"ai_chat\",status=\"200\""), "3");
        assert_eq!(count(&a, "operation=\"ai_chat\",status=\"402\""), "1");
        assert_eq!(count(&a, "operation=\"free\",status=\"200\""), "1");
        assert_eq!(count(&b, "operation=\"ai_chat\",status=\"200\""), "1");
    }
}
