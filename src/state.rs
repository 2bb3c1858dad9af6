//! Shared state: the current config generation ([`Runtime`], swapped atomically on reload), the
//! store, the key cache, the upstream client and id generation.

use std::ops::Deref;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;

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
    /// The longest wait for an answer head: `server.upstream_timeout_ms`, or an upstream's
    /// longer `first_byte_timeout_ms` (idempotency and job leases outlast it).
    pub upstream_timeout: Duration,
    /// The webhook HMAC key, read from the variable `notifications.webhook_secret_env` names.
    pub webhook_secret: Option<Vec<u8>>,
    /// Per-account rate limits by plan.
    pub rate_limits: crate::ratelimit::RateLimits,
    /// The top-up packages, as the charge step hands them to the store (auto top-ups buy these).
    pub packages: crate::ledger::Packages,
    /// The bounds the store keeps by itself (history, outbox).
    pub store_limits: crate::ledger::StoreLimits,
    /// The export HMAC key, read from the variable `export.secret_env` names.
    pub export_secret: Option<Vec<u8>>,
    /// Stripe, when `[billing.stripe]` is set (secrets read from the environment).
    pub stripe: Option<Arc<crate::billing::stripe::Stripe>>,
    /// TLS termination on the listeners (`server.tls`), read with this generation: a reload
    /// (SIGHUP) picks up renewed certificate files for every new connection.
    pub tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// The same for the admin listener (`server.admin_tls`).
    pub admin_tls_acceptor: Option<tokio_rustls::TlsAcceptor>,
    /// `sha256:<hex>` of the config (see [`crate::running::config_hash`]).
    pub config_hash: String,
    /// When this generation was compiled, RFC 3339 with milliseconds (UTC).
    pub loaded_at: String,
}

impl Runtime {
    /// Compiles a config; fails when an `env:` header names an unset variable.
    pub fn new(config: Config) -> Result<Self, ConfigError> {
        Self::with_env(config, |v| std::env::var(v).ok())
    }

    /// Like [`Runtime::new`] with an explicit environment lookup.
    pub fn with_env(config: Config, env: impl Fn(&str) -> Option<String>) -> Result<Self, ConfigError> {
        let upstreams = Upstreams::new(&config, &env)?;
        let n = &config.notifications;
        let webhook_secret = signing_key(
            &env,
            n.webhook_url.as_ref(),
            n.webhook_secret_env.as_deref(),
            "notifications.webhook_secret_env",
        )?;
        let packages = crate::ledger::Packages::new(
            config.topup_packages.iter().map(|(name, p)| (name.clone(), p.credits, p.price_eur)).collect(),
        );
        let store_limits = crate::ledger::StoreLimits {
            history_max_entries: config.history.max_entries,
            history_exported_only: config.export.url.is_some(),
            outbox_max_events: config.notifications.max_outbox_per_account,
            job_max_age_secs: (config.jobs.max_queue_age_hours as i64).saturating_mul(3600),
            job_retention_secs: (config.jobs.result_retention_hours as i64).saturating_mul(3600),
            charge_record_secs: config.charges.record_ttl_secs.min(i64::MAX as u64) as i64,
        };
        let x = &config.export;
        let export_secret = signing_key(&env, x.url.as_ref(), x.secret_env.as_deref(), "export.secret_env")?;
        let stripe = config
            .billing
            .stripe
            .as_ref()
            .map(|c| crate::billing::stripe::Stripe::new(c, &env).map(Arc::new))
            .transpose()?;
        let acceptor = |tls: Option<&crate::config::ListenerTls>, key: &str| {
            tls.map(|t| crate::proxy::tls::acceptor(t, key)).transpose()
        };
        let tls_acceptor = acceptor(config.server.tls.as_ref(), "server.tls")?;
        let admin_tls_acceptor = acceptor(config.server.admin_tls.as_ref(), "server.admin_tls")?;
        Ok(Runtime {
            tls_acceptor,
            admin_tls_acceptor,
            config_hash: crate::running::config_hash(&config),
            loaded_at: now_rfc3339_millis(),
            stripe,
            export_secret,
            store_limits,
            packages,
            webhook_secret,
            rate_limits: crate::ratelimit::RateLimits::new(&config),
            rules: Rules::new(&config),
            upstream_timeout: Duration::from_millis(config.server.upstream_timeout_ms)
                .max(upstreams.longest_first_byte_timeout()),
            upstreams,
            config,
        })
    }
}

impl Runtime {
    /// A charge request with this generation's terms filled in (thresholds, the auto top-up cap,
    /// the packages an auto top-up buys): the request path and the job runner set the rest, as
    /// `ChargeRequest { account, charge_id, .., ..rt.charge_terms() }`.
    pub fn charge_terms(&self) -> crate::ledger::ChargeRequest<'_> {
        crate::ledger::ChargeRequest {
            account: "",
            charge_id: "",
            cost: 0,
            operation: "",
            category: "",
            request_id: "",
            idempotency: None,
            thresholds: &self.config.notifications.thresholds_percent,
            auto_topup_max_per_period: self.config.auto_topup.max_per_period,
            packages: &self.packages,
        }
    }
}

/// Now as RFC 3339 in UTC with milliseconds: two reloads within a second still differ.
fn now_rfc3339_millis() -> String {
    let t = time::OffsetDateTime::now_utc();
    let t = t.replace_millisecond(t.millisecond()).unwrap_or(t);
    t.format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// The HMAC key a delivery target is signed with: read from the variable `var` names, required
/// (and non-empty) whenever `url` is set — deliveries are never unsigned.
fn signing_key(
    env: &impl Fn(&str) -> Option<String>,
    url: Option<&String>,
    var: Option<&str>,
    key: &str,
) -> Result<Option<Vec<u8>>, ConfigError> {
    let (Some(_), Some(var)) = (url, var) else { return Ok(None) };
    let value = env(var).filter(|s| !s.is_empty()).map(String::into_bytes);
    value.map(Some).ok_or_else(|| ConfigError {
        key: key.into(),
        reason: format!("environment variable {var} is not set (deliveries are always signed)"),
    })
}

/// Unique, unguessable ids for requests and charges: 128 bits from the calling thread's
/// CSPRNG (rand's `ThreadRng`: ChaCha12, seeded and periodically reseeded from the OS random
/// source), written as 32 hex digits.
///
/// Why not a counter: ids are shown to clients (`x-request-id`, charge ids in the ledger), and a
/// counter would tell any client how much traffic the gateway carries and let it guess ids.
/// Why not the OS random source per id: this is the hot path; the thread's generator needs no
/// system call (it reseeds every 64 KiB of output) and no lock, and one ChaCha block gives four
/// ids — a fraction of the HMAC-SHA256 per id this replaced. Two ids collide with probability
/// ~n²/2¹²⁹ within a process and across processes and restarts alike (each thread's generator
/// starts from its own OS seed).
#[derive(Default)]
pub struct IdGen(());

impl IdGen {
    /// A new id, unique across processes with overwhelming probability.
    pub fn next(&self) -> String {
        let bits: u128 = rand::Rng::random(&mut rand::rng());
        hex32(bits.to_le_bytes())
    }
}

/// 16 bytes as 32 lower-case hex digits, written into a byte buffer (`hex::encode` goes through
/// `char`s one by one).
fn hex32(bytes: [u8; 16]) -> String {
    let mut out = [0u8; 32];
    hex::encode_to_slice(bytes, &mut out).expect("32 digits for 16 bytes");
    std::str::from_utf8(&out).expect("hex digits are ASCII").to_owned()
}

/// What every handler shares.
pub struct Shared {
    /// Current config generation.
    pub runtime: ArcSwap<Runtime>,
    /// The ledger.
    pub ledger: Arc<Store>,
    /// API-key cache.
    pub keys: KeyCache,
    /// Upstream clients, one per worker thread (pools kept across config generations).
    pub clients: proxy::Clients,
    /// The runtime the gateway was started on: detached money tasks (refunds) run there, since
    /// a worker's runtime ends with its listener.
    pub background: tokio::runtime::Handle,
    /// The public listener's worker runtimes (their live tasks are reported in `/metrics`).
    pub workers: std::sync::OnceLock<Vec<tokio::runtime::Handle>>,
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
            || config.store.sentinels != old.store.sentinels
            || config.store.master_name != old.store.master_name
        {
            tracing::warn!("store settings changed in the config; they apply only after a restart");
        }
        if config.tls.ca_file != old.tls.ca_file {
            tracing::warn!("tls.ca_file changed in the config; it applies only after a restart");
        }
        let mut runtime = Runtime::new(config)?;
        runtime.upstreams.adopt(&current.upstreams);
        self.metrics.backends.set(runtime.upstreams.backends());
        crate::ledger::Ledger::set_limits(&*self.ledger, runtime.store_limits);
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
        assert!(all.iter().all(|id| id.len() == 32 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))));
        // Another thread's generator (seeded from the OS on its own) draws other ids.
        let other = std::thread::spawn(|| IdGen::default().next()).join().unwrap();
        assert!(!all.contains(&other));
    }
}
