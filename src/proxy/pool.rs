//! Upstream pools that heal: which backend gets a request (`balance`), how many it may hold
//! (`max_in_flight`), passive health (a backend that fails `eject_after` times in a row is
//! ejected for `eject_ms`, then one probe brings it back), active health checks
//! (`health_path`), and the per-backend figures `/metrics` and `GET /admin/v1/config` show.
//!
//! All of it is atomics on the request path: no lock, no allocation. A backend's state outlives
//! config reloads (it is handed on by name and URL), so a reload does not forget an ejection.

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;

use crate::config::{Balance, UpstreamUrl};
use crate::metrics::AtomicHistogram;

/// Milliseconds since the first look at the clock (never 0: 0 means "not ejected").
pub(crate) fn clock_ms() -> u64 {
    static EPOCH: LazyLock<Instant> = LazyLock::new(Instant::now);
    EPOCH.elapsed().as_millis() as u64 + 1
}

/// One backend URL of an upstream, with its health and figures.
#[derive(Debug)]
pub struct Backend {
    /// The upstream's name.
    pub upstream: Arc<str>,
    /// Where requests go.
    pub url: UpstreamUrl,
    /// The URL as configured, credentials redacted (labels, the config view).
    pub label: Arc<str>,
    in_flight: AtomicUsize,
    /// Failures in a row.
    failures: AtomicU32,
    /// Until when (see [`clock_ms`]) it gets no traffic; 0 while healthy.
    ejected_until: AtomicU64,
    /// A probe request is out (the ejection ran out, nothing has succeeded since).
    probing: AtomicBool,
    /// The ejection came from the active health check (which may then lift it), not traffic.
    ejected_by_check: AtomicBool,
    requests: AtomicU64,
    errors: AtomicU64,
    ejections: AtomicU64,
    latency: AtomicHistogram,
}

/// What the config view says of a backend.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Health {
    /// Gets traffic.
    Healthy,
    /// Gets none until its cool-down ends.
    Ejected,
    /// Its cool-down ended; the next request (or health check) decides.
    Probing,
}

impl Health {
    /// The name shown in `GET /admin/v1/config`.
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Ejected => "ejected",
            Health::Probing => "probing",
        }
    }
}

impl Backend {
    fn new(upstream: Arc<str>, url: UpstreamUrl, label: Arc<str>) -> Self {
        Backend {
            upstream,
            url,
            label,
            in_flight: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            ejected_until: AtomicU64::new(0),
            probing: AtomicBool::new(false),
            ejected_by_check: AtomicBool::new(false),
            requests: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            ejections: AtomicU64::new(0),
            latency: AtomicHistogram::exponential(0.0005, 2.0, 16),
        }
    }

    /// Its health now.
    pub fn health(&self) -> Health {
        match self.ejected_until.load(Ordering::Acquire) {
            0 => Health::Healthy,
            until if clock_ms() < until => Health::Ejected,
            _ => Health::Probing,
        }
    }

    /// Requests it holds now (answers still streaming included).
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether it may take a request now: healthy, or the one probe after its cool-down
    /// (`Some(true)`: the caller carries the probe).
    fn admits(&self) -> Option<bool> {
        match self.ejected_until.load(Ordering::Acquire) {
            0 => Some(false),
            until if clock_ms() < until => None,
            _ => self.probing.compare_exchange(false, true, Ordering::AcqRel, Ordering::Acquire).ok().map(|_| true),
        }
    }

    /// Takes an in-flight place unless `max` are taken.
    fn acquire(&self, max: Option<usize>) -> bool {
        match max {
            None => {
                self.in_flight.fetch_add(1, Ordering::Relaxed);
                true
            }
            Some(max) => {
                self.in_flight.fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| (n < max).then_some(n + 1)).is_ok()
            }
        }
    }

    /// A request or health check went well: healthy again.
    pub(crate) fn succeeded(&self) {
        if self.failures.load(Ordering::Relaxed) != 0 {
            self.failures.store(0, Ordering::Relaxed);
        }
        if self.ejected_until.load(Ordering::Relaxed) != 0 {
            self.ejected_until.store(0, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            tracing::info!(upstream = %self.upstream, backend = %self.label, "backend healthy again");
        }
    }

    /// The active health check passed: healthy again — unless traffic ejected it and its
    /// `eject_ms` has not run out (a backend may answer its health path and fail real requests;
    /// then it stays out for the whole cool-down and the probe request decides).
    pub(crate) fn check_passed(&self) {
        let until = self.ejected_until.load(Ordering::Acquire);
        if until != 0 && !self.ejected_by_check.load(Ordering::Acquire) && clock_ms() < until {
            return;
        }
        self.succeeded();
    }

    /// The active health check failed: counts like a failed request; an ejection it causes is
    /// one the next passing check lifts.
    pub(crate) fn check_failed(&self, eject_after: u32, eject: Duration, why: &str) {
        let was_ejected = self.ejected_until.load(Ordering::Acquire) != 0;
        let by_check = !was_ejected || self.ejected_by_check.load(Ordering::Acquire);
        self.failed(eject_after, eject, why);
        if by_check && self.ejected_until.load(Ordering::Acquire) != 0 {
            self.ejected_by_check.store(true, Ordering::Release);
        }
    }

    /// A request or health check failed; the `eject_after`-th in a row (or a failed probe)
    /// ejects it for `eject`.
    pub(crate) fn failed(&self, eject_after: u32, eject: Duration, why: &str) {
        self.errors.fetch_add(1, Ordering::Relaxed);
        let n = self.failures.fetch_add(1, Ordering::Relaxed).saturating_add(1);
        let probing = self.ejected_until.load(Ordering::Acquire) != 0;
        if n >= eject_after || probing {
            let until = clock_ms() + eject.as_millis() as u64;
            self.ejected_until.store(until, Ordering::Release);
            self.probing.store(false, Ordering::Release);
            self.ejected_by_check.store(false, Ordering::Release);
            if !probing {
                self.ejections.fetch_add(1, Ordering::Relaxed);
            }
            tracing::warn!(
                upstream = %self.upstream, backend = %self.label, failures = n, reason = why,
                eject_ms = eject.as_millis() as u64, "backend ejected"
            );
        }
    }
}

/// The backends of one upstream and how they are chosen.
#[derive(Debug)]
pub struct Pool {
    backends: Vec<Arc<Backend>>,
    next: AtomicUsize,
    balance: Balance,
    max_in_flight: Option<usize>,
    /// `eject_after`, `eject_ms`.
    pub(crate) eject_after: u32,
    pub(crate) eject: Duration,
}

/// Why no backend was picked.
#[derive(Debug, PartialEq, Eq)]
pub enum NoBackend {
    /// Every backend not yet tried is at `max_in_flight`.
    Busy,
    /// Every backend was tried.
    Exhausted,
}

impl Pool {
    /// A pool over `urls` (with their redacted labels).
    pub fn new(
        upstream: &Arc<str>,
        urls: Vec<(UpstreamUrl, Arc<str>)>,
        balance: Balance,
        max_in_flight: Option<usize>,
        eject_after: u32,
        eject: Duration,
    ) -> Self {
        let backends = urls.into_iter().map(|(u, label)| Arc::new(Backend::new(upstream.clone(), u, label))).collect();
        Pool { backends, next: AtomicUsize::new(0), balance, max_in_flight, eject_after, eject }
    }

    /// The backends, in config order.
    pub fn backends(&self) -> &[Arc<Backend>] {
        &self.backends
    }

    /// Takes over the state of `old`'s backends with the same URL (a reload keeps health and
    /// figures); only before the pool is shared.
    pub fn adopt(&mut self, old: &Pool) {
        for b in &mut self.backends {
            if let Some(prev) = old.backends.iter().find(|p| p.label == b.label) {
                *b = prev.clone();
            }
        }
    }

    /// Chooses a backend not in `tried` (a bit per index) and takes a place on it.
    ///
    /// Ejected backends are skipped while any other can be tried; when every untried one is
    /// ejected they are used anyway (better a likely failure than a certain one) — but not when
    /// a healthy one is merely full: that is [`NoBackend::Busy`].
    pub fn pick(&self, tried: u64) -> Result<Slot, NoBackend> {
        let n = self.backends.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let untried = |i: usize| i >= 64 || tried & (1 << i) == 0;
        let order = (0..n).map(|k| (start + k) % n).filter(|&i| untried(i));
        let mut busy = false;
        // Healthy (or probe-due) backends first.
        match self.balance {
            Balance::RoundRobin => {
                for i in order.clone() {
                    if let Some(slot) = self.take(i, false, &mut busy) {
                        return Ok(slot);
                    }
                }
            }
            Balance::LeastRequests => {
                // Fewest in flight; ties go round robin (the scan starts at a rotating index).
                let mut best: Option<(usize, usize)> = None;
                for i in order.clone() {
                    let b = &self.backends[i];
                    if b.health() == Health::Ejected {
                        continue;
                    }
                    let load = b.in_flight();
                    if best.is_none_or(|(_, l)| load < l) {
                        best = Some((i, load));
                    }
                }
                if let Some(slot) = best.and_then(|(i, _)| self.take(i, false, &mut busy)) {
                    return Ok(slot);
                }
                // Lost a race for it: any other that admits.
                for i in order.clone() {
                    if let Some(slot) = self.take(i, false, &mut busy) {
                        return Ok(slot);
                    }
                }
            }
        }
        // A healthy backend that is only full: busy (refunded, retried by the client) rather
        // than a spill onto one known to fail.
        if busy {
            return Err(NoBackend::Busy);
        }
        // Nothing healthy left to try: the ejected ones, as a last resort.
        for i in order {
            if let Some(slot) = self.take(i, true, &mut busy) {
                return Ok(slot);
            }
        }
        Err(if busy { NoBackend::Busy } else { NoBackend::Exhausted })
    }

    /// A place on backend `i` if it admits a request (or `anyway`) and has room.
    fn take(&self, i: usize, anyway: bool, busy: &mut bool) -> Option<Slot> {
        let b = &self.backends[i];
        let probe = match b.admits() {
            Some(probe) => probe,
            None if anyway => false,
            None => return None,
        };
        if !b.acquire(self.max_in_flight) {
            if probe {
                b.probing.store(false, Ordering::Release);
            }
            *busy = true;
            return None;
        }
        b.requests.fetch_add(1, Ordering::Relaxed);
        Some(Slot { backend: b.clone(), index: i, probe, started: Instant::now() })
    }
}

/// A request's place on a backend: released when dropped (with the answer's body, so a
/// streaming answer counts as in flight until it ends).
#[derive(Debug)]
pub struct Slot {
    backend: Arc<Backend>,
    index: usize,
    probe: bool,
    started: Instant,
}

impl Slot {
    /// The backend.
    pub fn backend(&self) -> &Backend {
        &self.backend
    }

    /// Its index in the pool (for [`Pool::pick`]'s `tried`).
    pub fn index(&self) -> usize {
        self.index
    }

    /// The backend answered (a head that is not 5xx): healthy; records the latency.
    pub fn answered(&mut self) {
        self.backend.latency.observe(self.started.elapsed().as_secs_f64());
        self.backend.succeeded();
        self.probe = false;
    }

    /// The backend failed this request.
    pub fn failed(&mut self, pool: &Pool, why: &str) {
        self.backend.failed(pool.eject_after, pool.eject, why);
        self.probe = false;
    }

    /// The backend failed mid-answer (a broken or stalled stream): counted as a failure.
    pub fn failed_late(&mut self, eject_after: u32, eject: Duration, why: &str) {
        self.backend.failed(eject_after, eject, why);
        self.probe = false;
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.backend.in_flight.fetch_sub(1, Ordering::Relaxed);
        if self.probe {
            // The probe ended without a verdict (cancelled): let another request probe.
            self.backend.probing.store(false, Ordering::Release);
        }
    }
}

/// The backends of the config in force, for `/metrics` (swapped on every reload).
#[derive(Debug, Default)]
pub struct BackendSet(ArcSwap<Vec<Arc<Backend>>>);

impl BackendSet {
    /// Replaces the set.
    pub fn set(&self, backends: Vec<Arc<Backend>>) {
        self.0.store(Arc::new(backends));
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BackendLabels {
    upstream: Arc<str>,
    backend: Arc<str>,
}

/// A metric's name, help and how to read it off a backend.
type Figure<T> = (&'static str, &'static str, fn(&Backend) -> T);

impl Collector for BackendSet {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let set = self.0.load();
        let labels = |b: &Backend| BackendLabels { upstream: b.upstream.clone(), backend: b.label.clone() };
        let counters: [Figure<u64>; 3] = [
            ("upstream_requests", "Requests sent to a backend (health checks not included)", |b| {
                b.requests.load(Ordering::Relaxed)
            }),
            ("upstream_errors", "Requests and health checks a backend failed (connect, 5xx, timeout, stalled)", |b| {
                b.errors.load(Ordering::Relaxed)
            }),
            ("upstream_ejections", "Times a backend was ejected", |b| b.ejections.load(Ordering::Relaxed)),
        ];
        for (name, help, value) in counters {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for b in set.iter() {
                ConstCounter::new(value(b)).encode(family.encode_family(&labels(b))?)?;
            }
        }
        let gauges: [Figure<i64>; 2] = [
            ("upstream_in_flight", "Requests a backend holds now (streaming answers included)", |b| {
                b.in_flight() as i64
            }),
            ("upstream_healthy", "1 while a backend gets traffic, 0 while it is ejected", |b| {
                i64::from(b.health() != Health::Ejected)
            }),
        ];
        for (name, help, value) in gauges {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
            for b in set.iter() {
                ConstGauge::new(value(b)).encode(family.encode_family(&labels(b))?)?;
            }
        }
        let mut family = encoder.encode_descriptor(
            "upstream_backend_seconds",
            "Time from sending a request to a backend to its answer head",
            None,
            MetricType::Histogram,
        )?;
        for b in set.iter() {
            b.latency.encode(family.encode_family(&labels(b))?)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::parse_upstream_url;

    fn pool(n: usize, balance: Balance, max: Option<usize>) -> Pool {
        let urls = (0..n)
            .map(|i| {
                let u = format!("http://127.0.0.1:{}", 1000 + i);
                (parse_upstream_url(&u).unwrap(), Arc::from(u.as_str()))
            })
            .collect();
        Pool::new(&Arc::from("ai"), urls, balance, max, 2, Duration::from_millis(50))
    }

    #[test]
    fn round_robin_takes_turns_and_skips_tried() {
        let p = pool(3, Balance::RoundRobin, None);
        let picks: Vec<usize> = (0..6).map(|_| p.pick(0).unwrap().index()).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        let s = p.pick(0b011).unwrap();
        assert_eq!(s.index(), 2);
        assert_eq!(p.pick(0b111).unwrap_err(), NoBackend::Exhausted);
    }

    #[test]
    fn least_requests_prefers_the_idle_backend() {
        let p = pool(2, Balance::LeastRequests, None);
        let held = p.pick(0).unwrap();
        for _ in 0..10 {
            assert_ne!(p.pick(0).unwrap().index(), held.index());
        }
    }

    #[test]
    fn max_in_flight_is_a_hard_cap() {
        let p = pool(2, Balance::RoundRobin, Some(1));
        let a = p.pick(0).unwrap();
        let b = p.pick(0).unwrap();
        assert_ne!(a.index(), b.index());
        assert_eq!(p.pick(0).unwrap_err(), NoBackend::Busy);
        drop(a);
        assert!(p.pick(0).is_ok());
        assert_eq!(b.backend().in_flight(), 1);
    }

    #[test]
    fn failures_in_a_row_eject_then_one_probe_heals() {
        let p = pool(2, Balance::RoundRobin, None);
        let bad = &p.backends()[0];
        bad.failed(2, p.eject, "test");
        assert_eq!(bad.health(), Health::Healthy, "one failure is not enough");
        bad.succeeded();
        bad.failed(2, p.eject, "test");
        assert_eq!(bad.health(), Health::Healthy, "a success in between resets the count");
        bad.failed(2, p.eject, "test");
        assert_eq!(bad.health(), Health::Ejected);
        // Ejected: every pick goes to the other.
        for _ in 0..6 {
            assert_eq!(p.pick(0).unwrap().index(), 1);
        }
        // ...unless the other was tried: then the ejected one anyway.
        assert_eq!(p.pick(0b10).unwrap().index(), 0);
        std::thread::sleep(Duration::from_millis(60));
        assert_eq!(bad.health(), Health::Probing);
        // One probe at a time.
        let mut probe = (0..2).map(|_| p.pick(0).unwrap()).find(|s| s.index() == 0).expect("probed");
        assert!((0..4).all(|_| p.pick(0).unwrap().index() == 1), "a second probe went out");
        probe.answered();
        assert_eq!(bad.health(), Health::Healthy);
        assert_eq!(bad.ejections.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_failed_probe_ejects_again_and_a_dropped_one_frees_the_probe() {
        let p = pool(2, Balance::RoundRobin, None);
        let bad = &p.backends()[0];
        bad.failed(1, p.eject, "test");
        std::thread::sleep(Duration::from_millis(60));
        let probe = (0..2).map(|_| p.pick(0).unwrap()).find(|s| s.index() == 0).expect("probed");
        drop(probe);
        let mut probe = (0..2).map(|_| p.pick(0).unwrap()).find(|s| s.index() == 0).expect("probed again");
        probe.failed(&p, "still down");
        assert_eq!(bad.health(), Health::Ejected);
    }
}
