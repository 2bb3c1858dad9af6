//! Request rate limits, with governor (GCRA keyed limiters):
//!
//! * **Per account, by plan** (`plans.NAME.rate_limit_per_second`): every request a key makes —
//!   proxied, or to the customer API (`/v1/credits…`, `/v1/jobs/…`) — draws from one allowance
//!   per account, in bursts of up to one second's worth ([`RateLimits::check`]).
//! * **Failed authentication per client address** (`rate_limits.failed_auth_per_minute`,
//!   `failed_auth_burst`): a missing, unknown or revoked API key on the public listener, or a
//!   wrong admin token, counts against the client's address ([`RateLimits::auth_failed`]); IPv6
//!   addresses count by their /64. An address over its allowance is refused by
//!   [`RateLimits::check_client`] *before* its key is looked up or its token compared, so a key
//!   scanner costs no store lookups and a guessed admin token is refused even when it is right.
//!   A key found in the cache is not asked about its address. At most `failed_auth_burst`
//!   store lookups run at once per address ([`RateLimits::lookup_gate`]); the rest wait their
//!   turn and are checked again, so a burst of concurrent guesses costs at most twice
//!   `failed_auth_burst` lookups (not one per connection) before the address is refused.
//!
//! A refusal is 429 `rate_limited` with `Retry-After`. Limits are per gateway instance (N
//! instances admit up to N times the rate) and start afresh on a config reload. Memory is
//! bounded: [`sweep`] (every `rate_limits.cleanup_interval_ms`) forgets every account and
//! address whose allowance has been full again for one emission interval, and the key cache's
//! expired entries.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant};

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::{Config, RateLimitsConfig};
use crate::error::GatewayError;
use crate::state::AppState;

/// The limiters of one config generation.
pub struct RateLimits {
    by_plan: HashMap<String, DefaultKeyedRateLimiter<Arc<str>>>,
    failed_auth: DefaultKeyedRateLimiter<IpAddr>,
    /// Addresses over their failed-authentication allowance, and until when. A governor check
    /// would spend a cell; this answers "is the address refused now?" without one.
    refused: RwLock<HashMap<IpAddr, Instant>>,
    clock: DefaultClock,
    /// `rate_limits.unknown_key_cache_ttl_ms` (the key cache's remembered unknown keys).
    unknown_key_ttl: Duration,
    /// `rate_limits.unknown_key_cache_entries`.
    unknown_key_entries: usize,
    /// Key lookups under way per client address, each address at most `failed_auth_burst` at
    /// once (an entry lives while someone holds or waits for a permit).
    lookups: std::sync::Mutex<HashMap<IpAddr, Arc<tokio::sync::Semaphore>>>,
    lookup_permits: usize,
}

/// A turn at a key lookup for one client address ([`RateLimits::lookup_gate`]).
pub struct LookupGate<'a> {
    limits: &'a RateLimits,
    ip: IpAddr,
    permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl Drop for LookupGate<'_> {
    fn drop(&mut self) {
        drop(self.permit.take());
        let mut lookups = self.limits.lookups.lock().unwrap_or_else(PoisonError::into_inner);
        // Nobody else holds or waits for this address's semaphore: forget it.
        if lookups.get(&self.ip).is_some_and(|s| Arc::strong_count(s) == 1) {
            lookups.remove(&self.ip);
        }
    }
}

/// How many keys each table holds (the `creditgate_rate_limit_entries` gauge).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entries {
    /// Accounts in the plan limiters.
    pub accounts: usize,
    /// Client addresses in the failed-authentication limiter.
    pub clients: usize,
    /// Client addresses refused right now.
    pub refused_clients: usize,
}

impl RateLimits {
    /// A limiter for every plan that sets `rate_limit_per_second`, and the per-address one.
    pub fn new(config: &Config) -> Self {
        let by_plan = config
            .plans
            .iter()
            .filter_map(|(name, plan)| {
                let rate = NonZeroU32::new(plan.rate_limit_per_second?)?;
                Some((name.clone(), DefaultKeyedRateLimiter::dashmap(Quota::per_second(rate))))
            })
            .collect();
        RateLimits {
            by_plan,
            failed_auth: DefaultKeyedRateLimiter::dashmap(failed_auth_quota(&config.rate_limits)),
            refused: RwLock::default(),
            clock: DefaultClock::default(),
            unknown_key_ttl: Duration::from_millis(config.rate_limits.unknown_key_cache_ttl_ms),
            unknown_key_entries: config.rate_limits.unknown_key_cache_entries,
            lookups: Default::default(),
            lookup_permits: (config.rate_limits.failed_auth_burst.max(1) as usize)
                .min(tokio::sync::Semaphore::MAX_PERMITS),
        }
    }

    /// Waits for a turn to look a key up for `ip`: at most `failed_auth_burst` lookups of one
    /// address run at once, so the failures of a burst of guesses are counted before more of
    /// them reach the store. Check [`RateLimits::check_client`] again once the turn comes.
    pub async fn lookup_gate(&self, ip: IpAddr) -> LookupGate<'_> {
        let ip = client_key(ip);
        let semaphore = {
            let mut lookups = self.lookups.lock().unwrap_or_else(PoisonError::into_inner);
            lookups.entry(ip).or_insert_with(|| Arc::new(tokio::sync::Semaphore::new(self.lookup_permits))).clone()
        };
        let permit = semaphore.acquire_owned().await.ok();
        LookupGate { limits: self, ip, permit }
    }

    /// How long the key cache answers an unknown key 401 without asking the store again.
    pub fn unknown_key_ttl(&self) -> Duration {
        self.unknown_key_ttl
    }

    /// Most unknown keys the key cache remembers.
    pub fn unknown_key_entries(&self) -> usize {
        self.unknown_key_entries
    }

    /// Admits one request of `account` on `plan`, or says how long to wait.
    pub fn check(&self, plan: &str, account: &Arc<str>) -> Result<(), GatewayError> {
        let Some(limiter) = self.by_plan.get(plan) else { return Ok(()) };
        limiter.check_key(account).map_err(|not_until| rate_limited(not_until.wait_time_from(self.clock.now())))
    }

    /// Refuses (429) a client address that is over its failed-authentication allowance; call it
    /// before anything that costs a store lookup or could let a guessed credential in.
    pub fn check_client(&self, ip: IpAddr) -> Result<(), GatewayError> {
        let ip = client_key(ip);
        let until = self.refused.read().unwrap_or_else(PoisonError::into_inner).get(&ip).copied();
        match until.map(|t| t.saturating_duration_since(Instant::now())) {
            Some(wait) if !wait.is_zero() => Err(rate_limited(wait)),
            _ => Ok(()),
        }
    }

    /// Counts a failed authentication from `ip`: the answer is `failure` (401) while the address
    /// is within its allowance, 429 once it is over it (and [`RateLimits::check_client`] refuses
    /// it until a retry may succeed).
    pub fn auth_failed(&self, ip: IpAddr, failure: GatewayError) -> GatewayError {
        let ip = client_key(ip);
        match self.failed_auth.check_key(&ip) {
            Ok(()) => failure,
            Err(not_until) => {
                let wait = not_until.wait_time_from(self.clock.now());
                let mut refused = self.refused.write().unwrap_or_else(PoisonError::into_inner);
                refused.insert(ip, Instant::now() + wait);
                rate_limited(wait)
            }
        }
    }

    /// Forgets accounts and addresses whose allowance has been full again for one interval.
    pub fn retain_recent(&self) {
        for limiter in self.by_plan.values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
        self.failed_auth.retain_recent();
        self.failed_auth.shrink_to_fit();
        let now = Instant::now();
        let mut refused = self.refused.write().unwrap_or_else(PoisonError::into_inner);
        refused.retain(|_, until| *until > now);
        refused.shrink_to_fit();
    }

    /// How many keys each table holds now.
    pub fn entries(&self) -> Entries {
        Entries {
            accounts: self.by_plan.values().map(|l| l.len()).sum(),
            clients: self.failed_auth.len(),
            refused_clients: self.refused.read().unwrap_or_else(PoisonError::into_inner).len(),
        }
    }
}

/// `failed_auth_per_minute` spread evenly over the minute, `failed_auth_burst` at once.
fn failed_auth_quota(c: &RateLimitsConfig) -> Quota {
    let per_minute = c.failed_auth_per_minute.max(1);
    let period = Duration::from_secs(60) / per_minute;
    let burst = NonZeroU32::new(c.failed_auth_burst).unwrap_or(NonZeroU32::MIN);
    Quota::with_period(period.max(Duration::from_nanos(1))).expect("non-zero period").allow_burst(burst)
}

fn rate_limited(wait: Duration) -> GatewayError {
    GatewayError::RateLimited { retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64 }
}

/// The limiter key of a client address: IPv4 as it is, IPv6 by its /64 — the block one
/// subscriber gets, so one host cannot claim 2^64 allowances.
pub fn client_key(ip: IpAddr) -> IpAddr {
    match ip.to_canonical() {
        IpAddr::V6(v6) => {
            let s = v6.segments();
            IpAddr::V6(Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
        }
        v4 => v4,
    }
}

/// One housekeeping pass: idle limiter entries and expired cached keys are forgotten, and the
/// table sizes published as `creditgate_rate_limit_entries`.
pub fn sweep(state: &AppState) {
    let rt = state.runtime.load();
    rt.rate_limits.retain_recent();
    let cached = state.keys.retain_recent(&rt.rate_limits);
    let e = rt.rate_limits.entries();
    let m = &state.metrics;
    for (table, n) in [
        ("accounts", e.accounts),
        ("clients", e.clients),
        ("refused_clients", e.refused_clients),
        ("known_keys", cached.known),
        ("unknown_keys", cached.unknown),
    ] {
        m.rate_limit_entries.get_or_create(&crate::metrics::TableLabels { table }).set(n as i64);
    }
}

/// Runs [`sweep`] every `rate_limits.cleanup_interval_ms` (read anew each time, so a reload applies).
pub fn spawn_sweeper(state: AppState, mut shutdown: tokio::sync::watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        loop {
            let every = Duration::from_millis(state.runtime.load().config.rate_limits.cleanup_interval_ms);
            tokio::select! {
                _ = tokio::time::sleep(every) => sweep(&state),
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped config with the `free` plan at 3/s and these failed-authentication limits.
    fn config(failed_auth_per_minute: u32, failed_auth_burst: u32) -> Config {
        let text = include_str!("../config/gateway.toml").replacen(
            "rate_limit_per_second = 5",
            "rate_limit_per_second = 3",
            1,
        );
        let mut config = Config::parse(&text).unwrap();
        config.rate_limits.failed_auth_per_minute = failed_auth_per_minute;
        config.rate_limits.failed_auth_burst = failed_auth_burst;
        config
    }

    #[test]
    fn a_burst_beyond_the_rate_is_refused_with_a_wait() {
        let limits = RateLimits::new(&config(30, 20));
        let a: Arc<str> = "a".into();
        let b: Arc<str> = "b".into();
        let admitted = (0..10).filter(|_| limits.check("free", &a).is_ok()).count();
        assert!((3..=4).contains(&admitted), "burst of 3 (maybe one refilled), got {admitted}");
        match limits.check("free", &a) {
            Err(GatewayError::RateLimited { retry_after_secs }) => assert_eq!(retry_after_secs, 1),
            other => panic!("expected rate_limited, got {other:?}"),
        }
        assert!(limits.check("free", &b).is_ok(), "accounts are limited separately");
        assert!(limits.check("no-such-plan", &a).is_ok());
    }

    #[test]
    fn failed_authentication_is_limited_per_address() {
        let limits = RateLimits::new(&config(2, 3));
        let unauthorized = || GatewayError::Unauthorized("no".into());
        let (a, b): (IpAddr, IpAddr) = ("192.0.2.1".parse().unwrap(), "192.0.2.2".parse().unwrap());
        for _ in 0..3 {
            assert!(limits.check_client(a).is_ok());
            assert!(matches!(limits.auth_failed(a, unauthorized()), GatewayError::Unauthorized(_)));
        }
        match limits.auth_failed(a, unauthorized()) {
            GatewayError::RateLimited { retry_after_secs } => assert!((29..=30).contains(&retry_after_secs)),
            other => panic!("expected rate_limited, got {other:?}"),
        }
        assert!(matches!(limits.check_client(a), Err(GatewayError::RateLimited { .. })), "refused before lookups");
        assert!(limits.check_client(b).is_ok(), "addresses are limited separately");
        assert_eq!(limits.entries().refused_clients, 1);
    }

    #[test]
    fn ipv6_clients_count_by_their_64() {
        let key = |s: &str| client_key(s.parse().unwrap());
        assert_eq!(key("2001:db8:1:2:aaaa::1"), key("2001:db8:1:2:bbbb::9"));
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        assert_eq!(key("::ffff:192.0.2.1"), key("192.0.2.1"));
    }

    #[test]
    fn idle_entries_are_forgotten() {
        let mut config = config(600_000, 20);
        // 1 ms emission interval, so the accounts are idle again within the sleep below.
        config.plans.get_mut("free").unwrap().rate_limit_per_second = Some(1000);
        let limits = RateLimits::new(&config);
        for i in 0..1000u32 {
            let _ = limits.auth_failed(IpAddr::from(i.to_be_bytes()), GatewayError::Unauthorized("no".into()));
            limits.check("free", &Arc::from(format!("acct-{i}"))).unwrap();
        }
        assert_eq!((limits.entries().clients, limits.entries().accounts), (1000, 1000));
        std::thread::sleep(Duration::from_millis(20));
        limits.retain_recent();
        assert_eq!((limits.entries().clients, limits.entries().accounts), (0, 0), "idle addresses and accounts");
    }
}
