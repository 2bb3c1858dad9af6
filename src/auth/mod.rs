//! Authentication: `Authorization: Bearer <api key>` → [`Principal`] (account + role).
//!
//! Keys are stored only as SHA-256 hashes. Lookups go through [`KeyCache`], so a busy key costs
//! no store round trip: an entry is trusted for [`FRESH`] (revocations reach every instance
//! within 5 s), then looked up again. When the store cannot answer, a key verified within
//! [`STALE_GRACE`] keeps working, so free routes stay up while the store is down.
//!
//! A key the store does not know (or that was revoked) is remembered for
//! `rate_limits.unknown_key_cache_ttl_ms` (at most `unknown_key_cache_entries` of them), so
//! repeating it costs no lookup either; every failure counts against the client's address
//! (`ratelimit.rs`), and an address over its allowance gets 429 before any lookup. [`admit`] is
//! the whole step — address, key, plan allowance — for the proxy and the customer API alike.

pub mod keys;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::error::GatewayError;
use crate::ledger::{KeyRecord, Ledger, Role};
use crate::ratelimit::RateLimits;
use crate::state::{AppState, Runtime};

pub use keys::{NewKey, generate_key, hash_key};

/// How long a looked-up key is trusted without asking the store again.
pub const FRESH: Duration = Duration::from_secs(4);
/// How long a known key keeps working while the store is unreachable.
pub const STALE_GRACE: Duration = Duration::from_secs(600);
/// Shards of each table (the unknown keys' `rate_limits.unknown_key_cache_entries` is split
/// evenly among them; when a shard is full of unexpired keys, further unknown keys are not
/// remembered — the per-address limit still bounds their lookups).
const SHARDS: usize = 16;

/// Who is calling: the request extension every later step reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Principal {
    /// Account the key belongs to.
    pub account: Arc<str>,
    /// Role of the key.
    pub role: Role,
    /// The key's public id.
    pub key_id: Arc<str>,
    /// The account's plan when the key was last looked up (rate limits; a change shows within [`FRESH`]).
    pub plan: Arc<str>,
}

struct Entry {
    principal: Principal,
    checked: Instant,
}

/// API-key cache, sharded so concurrent requests of different keys do not share a lock.
pub struct KeyCache {
    shards: [RwLock<HashMap<[u8; 32], Entry>>; SHARDS],
    /// Digests of keys the store did not know, with when it said so.
    unknown: [RwLock<HashMap<[u8; 32], Instant>>; SHARDS],
    /// Keys revoked through this instance, with when: a lookup that was already in flight must
    /// not put one back, and the stale grace never applies to them.
    revoked: std::sync::Mutex<HashMap<Arc<str>, Instant>>,
    /// Store lookups under way, by key digest: concurrent requests with a key that is not cached
    /// (64 connections opening with one key, every instance restarted under load, a cached entry
    /// gone stale) wait for the one lookup instead of each making their own.
    flights: [std::sync::Mutex<HashMap<[u8; 32], Arc<tokio::sync::Notify>>>; SHARDS],
}

/// The lookup of one key digest that a request leads; when dropped (done, failed or the request
/// gone) it leaves the flights and wakes the requests waiting for it.
struct Flight<'a> {
    cache: &'a KeyCache,
    digest: [u8; 32],
    done: Arc<tokio::sync::Notify>,
}

impl Drop for Flight<'_> {
    fn drop(&mut self) {
        self.cache.flights(&self.digest).lock().unwrap_or_else(std::sync::PoisonError::into_inner).remove(&self.digest);
        self.done.notify_waiters();
    }
}

impl Default for KeyCache {
    fn default() -> Self {
        Self {
            shards: std::array::from_fn(|_| RwLock::default()),
            unknown: std::array::from_fn(|_| RwLock::default()),
            revoked: Default::default(),
            flights: std::array::from_fn(|_| Default::default()),
        }
    }
}

/// How many keys the cache holds (after [`KeyCache::retain_recent`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cached {
    /// Verified keys.
    pub known: usize,
    /// Keys remembered as unknown.
    pub unknown: usize,
}

/// Steps "auth" and "rate limit" of every request a key can make — the metered proxy and the
/// customer API alike: the client's address (`peer`, or what a trusted proxy says), its key →
/// [`Principal`], then one request of the account's plan allowance.
pub async fn admit(
    state: &AppState,
    rt: &Runtime,
    headers: &HeaderMap,
    peer: Option<SocketAddr>,
) -> Result<Principal, GatewayError> {
    let client = crate::proxy::headers::client_ip(peer, headers, &rt.config.server.trusted_proxies);
    let principal = state.keys.authenticate(headers, &*state.ledger, client, &rt.rate_limits).await?;
    rt.rate_limits.check(&principal.plan, &principal.account)?;
    Ok(principal)
}

fn invalid_key() -> GatewayError {
    GatewayError::Unauthorized("This API key is not valid (unknown or revoked).".into())
}

impl KeyCache {
    /// The cached principal of `digest` if it is fresh; otherwise the stale entry, if any, with
    /// when the store last vouched for it.
    fn cached(&self, digest: &[u8; 32]) -> Result<Principal, Option<(Principal, Instant)>> {
        match self.shard(digest).read().expect("lock").get(digest) {
            Some(e) if e.checked.elapsed() < FRESH => Ok(e.principal.clone()),
            Some(e) => Err(Some((e.principal.clone(), e.checked))),
            None => Err(None),
        }
    }

    fn shard(&self, digest: &[u8; 32]) -> &RwLock<HashMap<[u8; 32], Entry>> {
        &self.shards[digest[0] as usize % SHARDS]
    }

    fn flights(&self, digest: &[u8; 32]) -> &std::sync::Mutex<HashMap<[u8; 32], Arc<tokio::sync::Notify>>> {
        &self.flights[digest[0] as usize % SHARDS]
    }

    /// Joins the lookup of `digest` under way (`Err`: wait for it, then read the cache) or starts
    /// one (`Ok`: this request looks the key up; others wait for it until the guard drops).
    fn join_flight(&self, digest: [u8; 32]) -> Result<Flight<'_>, tokio::sync::futures::OwnedNotified> {
        let mut flights = self.flights(&digest).lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(done) = flights.get(&digest) {
            // Registered before the lock is released, so the leader's wake-up cannot be missed.
            return Err(done.clone().notified_owned());
        }
        let done = Arc::new(tokio::sync::Notify::new());
        flights.insert(digest, done.clone());
        Ok(Flight { cache: self, digest, done })
    }

    /// Resolves the bearer key in `headers` to its principal. A failure counts against
    /// `client` in `limits`; a client over its allowance gets 429 and no store lookup.
    pub async fn authenticate<L: Ledger>(
        &self,
        headers: &HeaderMap,
        ledger: &L,
        client: IpAddr,
        limits: &RateLimits,
    ) -> Result<Principal, GatewayError> {
        let Some(key) = bearer(headers) else {
            let missing = GatewayError::Unauthorized("Send your API key as `Authorization: Bearer cg_…`.".into());
            return Err(limits.auth_failed(client, missing));
        };
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        if let Ok(principal) = self.cached(&digest) {
            return Ok(principal);
        }
        // Boxed: the store lookup's state (kilobytes) stays out of every request's future.
        Box::pin(self.look_up(digest, ledger, client, limits)).await
    }

    /// [`KeyCache::authenticate`] for a key the cache has no fresh entry of: asks the store
    /// (once for all concurrent requests with the key).
    async fn look_up<L: Ledger>(
        &self,
        digest: [u8; 32],
        ledger: &L,
        client: IpAddr,
        limits: &RateLimits,
    ) -> Result<Principal, GatewayError> {
        // A second pass only after waiting for another request's lookup of this key, whose
        // answer is then in the cache (or, if it failed, this request asks the store itself).
        let mut waited = false;
        let (stale, _flight) = loop {
            let stale = match self.cached(&digest) {
                Ok(principal) => return Ok(principal),
                Err(stale) => stale,
            };
            if stale.is_none() && self.is_unknown(&digest, limits) {
                return Err(limits.auth_failed(client, invalid_key()));
            }
            if waited {
                break (stale, None);
            }
            match self.join_flight(digest) {
                Ok(flight) => break (stale, Some(flight)),
                Err(done) => {
                    done.await;
                    waited = true;
                }
            }
        };
        limits.check_client(client)?;
        // One of at most `failed_auth_burst` lookups of this address at once; the ones before
        // it may have used the address's allowance up meanwhile.
        let _turn = limits.lookup_gate(client).await;
        limits.check_client(client)?;
        // Stamped before the lookup, so an entry is never trusted longer than FRESH after the
        // store said so.
        let asked = Instant::now();
        match lookup(ledger, &hex::encode(digest)).await {
            Ok(Some((record, plan))) if !self.is_revoked(&record.key_id) => {
                let principal = Principal {
                    account: record.account.into(),
                    role: record.role,
                    key_id: record.key_id.into(),
                    plan: plan.into(),
                };
                let entry = Entry { principal: principal.clone(), checked: asked };
                self.shard(&digest).write().expect("lock").insert(digest, entry);
                Ok(principal)
            }
            Ok(_) => {
                self.shard(&digest).write().expect("lock").remove(&digest);
                self.remember_unknown(digest, limits);
                Err(limits.auth_failed(client, invalid_key()))
            }
            Err(e) => match stale {
                Some((principal, checked))
                    if checked.elapsed() < STALE_GRACE && !self.is_revoked(&principal.key_id) =>
                {
                    tracing::warn!(error = %e, "store unreachable; using a recently verified API key");
                    Ok(principal)
                }
                _ => Err(e.into()),
            },
        }
    }

    fn is_unknown(&self, digest: &[u8; 32], limits: &RateLimits) -> bool {
        let shard = self.unknown[digest[0] as usize % SHARDS].read().expect("lock");
        shard.get(digest).is_some_and(|at| at.elapsed() < limits.unknown_key_ttl())
    }

    fn remember_unknown(&self, digest: [u8; 32], limits: &RateLimits) {
        let (ttl, most) = (limits.unknown_key_ttl(), limits.unknown_key_entries().div_ceil(SHARDS));
        let mut shard = self.unknown[digest[0] as usize % SHARDS].write().expect("lock");
        if shard.len() >= most {
            shard.retain(|_, at| at.elapsed() < ttl);
        }
        if shard.len() < most {
            shard.insert(digest, Instant::now());
        }
    }

    /// Forgets what can no longer be used: unknown keys older than
    /// `rate_limits.unknown_key_cache_ttl_ms`, and verified keys not looked up for
    /// [`STALE_GRACE`] (past it they are asked about anew anyway).
    pub fn retain_recent(&self, limits: &RateLimits) -> Cached {
        let mut cached = Cached { known: 0, unknown: 0 };
        for shard in &self.shards {
            let mut shard = shard.write().expect("lock");
            shard.retain(|_, e| e.checked.elapsed() < STALE_GRACE);
            shard.shrink_to_fit();
            cached.known += shard.len();
        }
        for shard in &self.unknown {
            let mut shard = shard.write().expect("lock");
            shard.retain(|_, at| at.elapsed() < limits.unknown_key_ttl());
            shard.shrink_to_fit();
            cached.unknown += shard.len();
        }
        cached
    }

    fn is_revoked(&self, key_id: &str) -> bool {
        self.revoked.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(key_id)
    }

    /// Forgets a key on this instance at once (other instances follow within [`FRESH`]).
    pub fn forget_key_id(&self, key_id: &str) {
        {
            let mut revoked = self.revoked.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            revoked.retain(|_, at| at.elapsed() < STALE_GRACE);
            revoked.insert(key_id.into(), Instant::now());
        }
        for shard in &self.shards {
            shard.write().expect("lock").retain(|_, e| &*e.principal.key_id != key_id);
        }
    }
}

/// The key record and its account's plan; `None` when the key or its account is gone.
async fn lookup<L: Ledger>(ledger: &L, hash: &str) -> crate::ledger::LedgerResult<Option<(KeyRecord, String)>> {
    let Some(record) = ledger.find_key(hash).await? else { return Ok(None) };
    Ok(ledger.account(&record.account).await?.map(|a| (record, a.plan)))
}

/// The bearer token of an `Authorization` header.
pub fn bearer(headers: &HeaderMap) -> Option<&str> {
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| token.trim()).filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ledger::{KeyRecord, MemoryLedger, NewAccount};

    fn headers(v: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(http::header::AUTHORIZATION, v.parse().unwrap());
        h
    }

    #[test]
    fn bearer_parsing() {
        assert_eq!(bearer(&headers("Bearer cg_abc")), Some("cg_abc"));
        assert_eq!(bearer(&headers("bearer  cg_abc ")), Some("cg_abc"));
        assert_eq!(bearer(&headers("Basic xyz")), None);
        assert_eq!(bearer(&headers("Bearer ")), None);
        assert_eq!(bearer(&HeaderMap::new()), None);
    }

    #[tokio::test]
    async fn known_key_resolves_unknown_key_is_401() {
        let ledger = MemoryLedger::new();
        let new = NewAccount { id: "a1".into(), plan: "pro".into(), allocation: 10, anchor: 0, email: None };
        assert!(ledger.create_account(new).await.unwrap());
        let k = generate_key();
        let record = KeyRecord {
            key_id: k.key_id.clone(),
            account: "a1".into(),
            role: Role::System,
            hash: k.hash.clone(),
            prefix: k.prefix.clone(),
            created_at: 0,
        };
        assert!(ledger.create_key(record).await.unwrap());
        let cache = KeyCache::default();
        let config = crate::config::Config::parse(include_str!("../../config/gateway.toml")).unwrap();
        let limits = RateLimits::new(&config);
        let ip = IpAddr::from([192, 0, 2, 1]);
        let p = cache.authenticate(&headers(&format!("Bearer {}", k.key)), &ledger, ip, &limits).await.unwrap();
        assert_eq!((&*p.account, p.role), ("a1", Role::System));
        let e = cache.authenticate(&headers("Bearer cg_nope"), &ledger, ip, &limits).await.unwrap_err();
        assert!(matches!(e, GatewayError::Unauthorized(_)));
        assert_eq!(cache.retain_recent(&limits), Cached { known: 1, unknown: 1 }, "the unknown key is remembered");
        let e = cache.authenticate(&HeaderMap::new(), &ledger, ip, &limits).await.unwrap_err();
        assert!(matches!(e, GatewayError::Unauthorized(_)));
    }
}
