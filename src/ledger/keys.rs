//! The Redis key schema, in one place.
//!
//! Every key of one account starts with the account hash's name, `cg:{acct:<id>}`, so they all
//! share its hash tag and live in one cluster slot: each ledger script touches a single slot and
//! runs unchanged on standalone Redis and on Redis Cluster. A per-account key is always
//! `<account key>:<kind>:<id>`; `lua/refund.lua` relies on that to reach the idempotency record
//! whose name it only learns from the charge record.
//!
//! | key | type | TTL | holds |
//! |---|---|---|---|
//! | `cg:{acct:<id>}` | hash | none | `plan`, `allocation`, `pending_plan`, `pending_allocation`, `anchor`, `period` (index from the anchor), `monthly`, `topup`, `used`, `email`, `now` (highest clock seen), `created_at` |
//! | `cg:{acct:<id>}:charge:<charge id>` | hash | 24 h | `cost`, `from_monthly`, `from_topup`, `period`, `idem`, `refunded`, `operation`, `category`, `request_id`, `at` |
//! | `cg:{acct:<id>}:idem:<idempotency key>` | hash | 24 h | `fingerprint`, `charge_id` and a copy of the split (`cost`, `from_monthly`, `from_topup`) |
//! | `cg:{acct:<id>}:topup:<payment ref>` | hash | none | `credits`, `package`, `topup_remaining`, `created_at` |
//! | `cg:key:<sha-256 hex>` | hash | none | `key_id`, `account`, `role`, `hash`, `prefix`, `created_at` |
//! | `cg:keyid:<key id>` | string | none | the key's hash, so a key can be revoked by its public id |
//!
//! API-key records are looked up by hash before the account is known, so they carry no account
//! tag; each is its own slot, which spreads them over the cluster. Nothing else is global.

/// Prefix of every key creditgate writes.
const PREFIX: &str = "cg";

/// The account hash; its name is the prefix of every other key of the account.
pub fn account(id: &str) -> String {
    format!("{PREFIX}:{{acct:{id}}}")
}

/// A charge record (refunds and re-sent charges), kept 24 h.
pub fn charge(account_id: &str, charge_id: &str) -> String {
    format!("{}:charge:{charge_id}", account(account_id))
}

/// An idempotency record: fingerprint and charge id under a client's `Idempotency-Key`, kept 24 h.
pub fn idempotency(account_id: &str, key: &str) -> String {
    format!("{}:idem:{key}", account(account_id))
}

/// A top-up receipt, by payment reference (kept: a payment reference credits once, ever).
pub fn topup(account_id: &str, payment_ref: &str) -> String {
    format!("{}:topup:{payment_ref}", account(account_id))
}

/// An API-key record, by the hex SHA-256 of the plaintext.
pub fn api_key(hash: &str) -> String {
    format!("{PREFIX}:key:{hash}")
}

/// The hash of an API key, by the key's public id.
pub fn api_key_id(key_id: &str) -> String {
    format!("{PREFIX}:keyid:{key_id}")
}

/// A key outside every account's namespace (no `{acct:` tag): the readiness probe runs the real
/// account script on it, which finds no account and writes nothing.
pub const READINESS_PROBE: &str = "cg:readyz";

#[cfg(test)]
mod tests {
    /// The hash tag: what Redis Cluster hashes when a key has a non-empty `{...}`.
    fn tag(key: &str) -> &str {
        let open = key.find('{').expect("has a tag");
        let close = key[open + 1..].find('}').expect("tag closes") + open + 1;
        &key[open + 1..close]
    }

    #[test]
    fn every_key_of_an_account_shares_its_tag() {
        let a = super::account("acme");
        assert_eq!(tag(&a), "acct:acme");
        for key in [super::charge("acme", "c1"), super::idempotency("acme", "k{}"), super::topup("acme", "p1")] {
            assert!(key.starts_with(&format!("{a}:")), "{key}");
            assert_eq!(tag(&key), tag(&a), "{key}");
        }
    }
}
