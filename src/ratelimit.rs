//! Per-account request rate limits (`plans.NAME.rate_limit_per_second`), with governor.
//!
//! One keyed GCRA limiter per plan, keyed by account: an account may send its plan's rate per
//! second, in bursts of up to one second's worth. Limits are per gateway instance (N instances
//! admit up to N times the rate) and restart on a config reload. A refusal is 429
//! `rate_limited` with `Retry-After`.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::Arc;

use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota};

use crate::config::Config;
use crate::error::GatewayError;

/// The limiters of one config generation.
pub struct RateLimits {
    by_plan: HashMap<String, DefaultKeyedRateLimiter<Arc<str>>>,
    clock: DefaultClock,
}

impl RateLimits {
    /// A limiter for every plan that sets `rate_limit_per_second`.
    pub fn new(config: &Config) -> Self {
        let by_plan = config
            .plans
            .iter()
            .filter_map(|(name, plan)| {
                let rate = NonZeroU32::new(plan.rate_limit_per_second?)?;
                Some((name.clone(), DefaultKeyedRateLimiter::dashmap(Quota::per_second(rate))))
            })
            .collect();
        RateLimits { by_plan, clock: DefaultClock::default() }
    }

    /// Admits one request of `account` on `plan`, or says how long to wait.
    pub fn check(&self, plan: &str, account: &Arc<str>) -> Result<(), GatewayError> {
        let Some(limiter) = self.by_plan.get(plan) else { return Ok(()) };
        limiter.check_key(account).map_err(|not_until| {
            let wait = not_until.wait_time_from(self.clock.now());
            GatewayError::RateLimited { retry_after_secs: wait.as_secs_f64().ceil().max(1.0) as u64 }
        })
    }

    /// Forgets accounts that have been quiet long enough to be back at a full burst.
    pub fn retain_recent(&self) {
        for limiter in self.by_plan.values() {
            limiter.retain_recent();
            limiter.shrink_to_fit();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_beyond_the_rate_is_refused_with_a_wait() {
        let text = include_str!("../config/gateway.toml").replacen(
            "rate_limit_per_second = 5",
            "rate_limit_per_second = 3",
            1,
        );
        let limits = RateLimits::new(&Config::parse(&text).unwrap());
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
}
