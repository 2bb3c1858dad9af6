//! Authentication: `Authorization: Bearer <api key>` → [`Principal`] (account + role).
//!
//! Keys are stored only as SHA-256 hashes. Lookups go through [`KeyCache`], so a busy key costs
//! no store round trip: an entry is trusted for [`FRESH`] (revocations reach every instance
//! within 5 s), then looked up again. When the store cannot answer, a key verified within
//! [`STALE_GRACE`] keeps working, so free routes stay up while the store is down.

pub mod keys;

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use http::HeaderMap;
use sha2::{Digest, Sha256};

use crate::error::GatewayError;
use crate::ledger::{KeyRecord, Ledger, Role};

pub use keys::{NewKey, generate_key, hash_key};

/// How long a looked-up key is trusted without asking the store again.
pub const FRESH: Duration = Duration::from_secs(4);
/// How long a known key keeps working while the store is unreachable.
pub const STALE_GRACE: Duration = Duration::from_secs(600);
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
    /// Keys revoked through this instance, with when: a lookup that was already in flight must
    /// not put one back, and the stale grace never applies to them.
    revoked: std::sync::Mutex<HashMap<Arc<str>, Instant>>,
}

impl Default for KeyCache {
    fn default() -> Self {
        Self { shards: std::array::from_fn(|_| RwLock::default()), revoked: Default::default() }
    }
}

impl KeyCache {
    fn shard(&self, digest: &[u8; 32]) -> &RwLock<HashMap<[u8; 32], Entry>> {
        &self.shards[digest[0] as usize % SHARDS]
    }

    /// Resolves the bearer key in `headers` to its principal.
    pub async fn authenticate<L: Ledger>(&self, headers: &HeaderMap, ledger: &L) -> Result<Principal, GatewayError> {
        let key = bearer(headers)
            .ok_or_else(|| GatewayError::Unauthorized("Send your API key as `Authorization: Bearer cg_…`.".into()))?;
        let digest: [u8; 32] = Sha256::digest(key.as_bytes()).into();
        let stale = {
            let shard = self.shard(&digest).read().expect("lock");
            match shard.get(&digest) {
                Some(e) if e.checked.elapsed() < FRESH => return Ok(e.principal.clone()),
                Some(e) => Some((e.principal.clone(), e.checked)),
                None => None,
            }
        };
        // Stamped before the lookup, so an entry is never trusted longer than FRESH after the
        // store said so.
        let asked = Instant::now();
        match lookup(ledger, &hex::encode(digest)).await {
            Ok(Some((record, _))) if self.is_revoked(&record.key_id) => {
                Err(GatewayError::Unauthorized("This API key is not valid (unknown or revoked).".into()))
            }
            Ok(Some((record, plan))) => {
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
            Ok(None) => {
                self.shard(&digest).write().expect("lock").remove(&digest);
                Err(GatewayError::Unauthorized("This API key is not valid (unknown or revoked).".into()))
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
        let p = cache.authenticate(&headers(&format!("Bearer {}", k.key)), &ledger).await.unwrap();
        assert_eq!((&*p.account, p.role), ("a1", Role::System));
        let e = cache.authenticate(&headers("Bearer cg_nope"), &ledger).await.unwrap_err();
        assert!(matches!(e, GatewayError::Unauthorized(_)));
        let e = cache.authenticate(&HeaderMap::new(), &ledger).await.unwrap_err();
        assert!(matches!(e, GatewayError::Unauthorized(_)));
    }
}
