//! Shared state: the current config generation ([`Runtime`], swapped atomically on reload), the
//! store, the key cache, the upstream client and id generation.

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use arc_swap::ArcSwap;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::auth::KeyCache;
use crate::classify::Rules;
use crate::config::{Config, ConfigError};
use crate::proxy::{self, Upstreams};
use crate::store::Store;

/// One config generation, compiled for the request path.
pub struct Runtime {
    /// The validated config.
    pub config: Config,
    /// Route table and prices.
    pub rules: Rules,
    /// Upstream pools with resolved credentials.
    pub upstreams: Upstreams,
    /// `server.upstream_timeout_ms`.
    pub upstream_timeout: Duration,
    /// The webhook HMAC key, read from the variable `notifications.webhook_secret_env` names.
    pub webhook_secret: Option<Vec<u8>>,
    /// Per-account rate limits by plan.
    pub rate_limits: crate::ratelimit::RateLimits,
    /// The top-up packages, as the charge step hands them to the store (auto top-ups buy these).
    pub packages: crate::ledger::Packages,
}

impl Runtime {
    /// Compiles a config; fails when an `env:` header names an unset variable.
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        Self::with_env(config, |v| std::env::var(v).ok())
    }

    /// Like [`Runtime::new`] with an explicit environment lookup.
    pub fn with_env(config: Config, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let upstreams = Upstreams::new(&config, &env)?;
        let webhook_secret = match (&config.notifications.webhook_url, &config.notifications.webhook_secret_env) {
            (Some(_), Some(var)) => {
                Some(env(var).filter(|s| !s.is_empty()).map(String::into_bytes).ok_or_else(|| ConfigError {
                    key: "notifications.webhook_secret_env".into(),
                    reason: format!("environment variable {var} is not set (webhooks are always signed)"),
                })?)
            }
            _ => None,
        };
        let packages = crate::ledger::Packages::new(
            config.topup_packages.iter().map(|(name, p)| (name.clone(), p.credits, p.price_eur)).collect(),
        );
        Ok(Runtime {
            packages,
            webhook_secret,
            rate_limits: crate::ratelimit::RateLimits::new(&config),
            rules: Rules::new(&config),
            upstream_timeout: Duration::from_millis(config.server.upstream_timeout_ms),
            upstreams,
            config,
        })
    }
}

/// Unique, unguessable ids for requests and charges: HMAC-SHA256 of a counter under a random
/// per-process key, truncated to 128 bits and written as 32 hex digits.
///
/// Why not a counter: ids are shown to clients (`x-request-id`, charge ids in the ledger), and a
/// counter would tell any client how much traffic the gateway carries and let it guess ids.
/// Why not the OS random source per id: this is the hot path, and the keyed hash needs no system
/// call — the key is drawn once, each id costs two SHA-256 blocks. The counter keeps ids
/// distinct within a process (a PRF of distinct inputs collides with probability ~n²/2¹²⁹);
/// the random key keeps them distinct across processes and restarts.
pub struct IdGen {
    keyed: Hmac<Sha256>,
    counter: AtomicU64,
}

impl Default for IdGen {
    fn default() -> Self {
        let mut key = [0u8; 32];
        getrandom::fill(&mut key).expect("OS random source");
        Self { keyed: Hmac::new_from_slice(&key).expect("HMAC takes keys of any length"), counter: AtomicU64::new(0) }
    }
}

impl IdGen {
    /// A new id, unique across processes with overwhelming probability.
    pub fn next(&self) -> String {
        let n = self.counter.fetch_add(1, Ordering::Relaxed);
        let mut mac = self.keyed.clone();
        mac.update(&n.to_le_bytes());
        hex::encode(&mac.finalize().into_bytes()[..16])
    }
}

/// What every handler shares.
pub struct Shared {
    /// Current config generation.
    pub runtime: ArcSwap<Runtime>,
    /// The ledger.
    pub ledger: Arc<Store>,
    /// API-key cache.
    pub keys: KeyCache,
    /// Upstream client (one pool for all generations).
    pub client: proxy::Client,
    /// Request and charge ids.
    pub ids: IdGen,
    /// Admin bearer token.
    pub admin_token: Option<String>,
    /// Config file, for reloads.
    pub config_path: Option<PathBuf>,
    /// Prometheus metrics.
    pub metrics: crate::metrics::Metrics,
    /// Wakes the job runner (top-ups).
    pub jobs_wake: tokio::sync::Notify,
}

/// Cheap-to-clone handle on [`Shared`].
#[derive(Clone)]
pub struct AppState(pub Arc<Shared>);

impl Deref for AppState {
    type Target = Shared;
    fn deref(&self) -> &Shared {
        &self.0
    }
}

impl AppState {
    /// Re-reads the config file and swaps it in; on any error the old config stays in force.
    pub fn reload(&self) -> Result<(), ConfigError> {
        let path = self.config_path.as_ref().ok_or_else(|| ConfigError {
            key: "config".into(),
            reason: "started without a config file; nothing to reload".into(),
        })?;
        let config = Config::load(path)?;
        let current = self.runtime.load();
        let old = &current.config;
        if config.server.listen != old.server.listen || config.server.admin_listen != old.server.admin_listen {
            tracing::warn!("listener addresses changed in the config; they apply only after a restart");
        }
        if config.store.kind != old.store.kind
            || config.store.url != old.store.url
            || config.store.nodes != old.store.nodes
        {
            tracing::warn!("store settings changed in the config; they apply only after a restart");
        }
        let runtime = Runtime::new(config)?;
        self.runtime.store(Arc::new(runtime));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use super::IdGen;

    #[test]
    fn ids_are_unique_and_do_not_count() {
        let ids = IdGen::default();
        let all: Vec<String> = (0..100_000).map(|_| ids.next()).collect();
        assert_eq!(all.iter().collect::<HashSet<_>>().len(), all.len(), "duplicate id");
        // A counter shows as a long prefix shared by neighbours; random ids share ~0.07 hex digits.
        let shared: usize =
            all.windows(2).map(|w| w[0].bytes().zip(w[1].bytes()).take_while(|(a, b)| a == b).count()).sum();
        assert!(shared < all.len() / 5, "neighbouring ids share {shared} leading digits in total");
        assert!(all.iter().all(|id| id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit())));
        // Another generator (another process, a restart) draws another key.
        let other = IdGen::default();
        assert!(!all.contains(&other.next()));
    }
}
