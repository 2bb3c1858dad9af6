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
//! | `cg:{acct:<id>}` | hash | none | `state`: the values every step reads, one field so a charge reads and writes it once — 14 integers as MessagePack, `monthly topup used hist htrim now` then `period_end allocation period evt auto_count auto_enabled xb hphys` (`lua/lib.lua` "the account hash" has the layout and how to read it by hand): credits in the buckets and used this period, history entries so far and trimmed as readers see it, the highest clock seen, the start of the next period (cached so the hot path does no calendar arithmetic), the period index from the anchor, events so far (for ids), auto top-ups this period, auto top-up on (1/0), the charge record bucket whose expiry the account set (-1 none), history entries removed from the list (`lua/lib.lua`; accounts from versions before it hold these as fields of their own, moved into `state` by their next write). Also `plan`, `pending_plan`, `pending_allocation`, `anchor`, `email`, `created_at`, `auto_threshold`, `auto_package`, `auto_credits`, `auto_price` (Rust f64 text), `auto_price_json`, `auto_armed` (buy on the next charge below the threshold), `exp` (last exported seq), `qbytes`, `odrop`, `bill_*`, `fired:<threshold>` (period in which that low-credit threshold last fired) |
//! | `cg:{acct:<id>}:charges:<bucket>` | hash | 2 × `charges.record_ttl_secs` from the bucket's first record | one field per charge made in the bucket (`bucket` = Redis time ÷ the record TTL): charge id → its amounts (MessagePack), `<len>:<category><len>:<operation>` and the idempotency key (`lua/lib.lua` "charge records" has the forms); a record lives between one and two TTLs, a lookup reads this bucket and the one before |
//! | `cg:{acct:<id>}:charge:<charge id>` | hash | 24 h | a charge record as versions before the buckets wrote it (`cost`, `from_monthly`, `from_topup`, `period`, `day`, `idem`, `refunded`, `operation`, `category`, …): still refunded correctly, no longer written |
//! | `cg:{acct:<id>}:idem:<idempotency key>` | hash | 24 h | `fingerprint`, `charge_id` and a copy of the split (`cost`, `from_monthly`, `from_topup`) |
//! | `cg:{acct:<id>}:topup:<payment ref>` | hash | none | `credits`, `package`, `topup_remaining`, `created_at` |
//! | `cg:{acct:<id>}:history` | list | none | history entries as JSON ([`super::HistoryEntry`]), oldest first; entry `seq` at index `seq - 1 - hphys`; entries up to `htrim` are trimmed for readers and leave the list in batches |
//! | `cg:{acct:<id>}:usage:<period index>` | hash | none, deleted at the renewal that takes it out of the 13 kept periods | net credits: one counter per day, category and operation, `u:<UTC day number>:<length of the category>:<category><operation>` (the total and the breakdowns are its sums), and `f:<operation>` free automatic uses; hashes written by earlier versions also hold `t`, `c:<category>`, `o:<operation>`, `d:<day>`, which are still read |
//! | `cg:{acct:<id>}:outbox` | list | none | undelivered events as JSON ([`super::Event`]), oldest first |
//! | `cg:{acct:<id>}:keys` | hash | none | key id → JSON of the key's public fields (`key_id`, `role`, `prefix`, `created_at`, `hash`), for listing an account's keys |
//! | `cg:key:<sha-256 hex>` | hash | none | `key_id`, `account`, `role`, `hash`, `prefix`, `created_at` |
//! | `cg:keyid:<key id>` | string | none | the key's hash, so a key can be revoked by its public id |
//! | `cg:outbox:index:<0..15>` | set | none | ids of accounts whose outbox may hold events, sharded by a hash of the id |
//! | `cg:{acct:<id>}:queue` | list | none | ids of the account's queued and running jobs, oldest first |
//! | `cg:{acct:<id>}:job:<job id>` | hash | none while queued or running; the result retention once `done` / `failed` | `operation`, `category`, `cost`, `upstream`, `method`, `path`, `headers` (JSON array of `[name, value]` pairs), `body` (raw bytes; deleted when the job finishes), `request_id`, `status` (`queued`, `running`, `done`, `failed`), `lease_owner` and `lease_until` (while a runner holds it), `not_before`, `attempts`, `created_at`, `updated_at`, `result_status`, `result_headers` (JSON pairs), `result_body` (raw bytes), `error` |
//! | `cg:jobs:index:<0..15>` | set | none | ids of accounts whose queue may hold jobs, sharded like the outbox index |
//!
//! API-key records are looked up by hash before the account is known, so they carry no account
//! tag; each is its own slot, which spreads them over the cluster. The outbox index and the job
//! index are the only other global data: the event dispatcher and the job runner must find the
//! accounts with events (queued jobs) without scanning the keyspace, and a script touching an
//! account's slot cannot also write a global set, so the Rust side adds the account after the
//! script (see [`super::redis`]). Each index is split in [`OUTBOX_SHARDS`] ([`JOB_SHARDS`]) sets
//! without a hash tag, so the shards spread over the cluster instead of making one node hold (and
//! serve) the whole index.

/// Prefix of every key creditgate writes.
const PREFIX: &str = "cg";

/// The account hash; its name is the prefix of every other key of the account.
pub fn account(id: &str) -> String {
    AccountKey(id).parts().concat()
}

/// [`account`] as a command argument, written straight into the command (the charge's hot path
/// makes no `String` of it).
pub struct AccountKey<'a>(pub &'a str);

impl AccountKey<'_> {
    /// The key's text in pieces: the one place that spells an account key.
    fn parts(&self) -> [&str; 4] {
        [PREFIX, ":{acct:", self.0, "}"]
    }
}

impl redis::ToRedisArgs for AccountKey<'_> {
    fn write_redis_args<W: ?Sized + redis::RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut w = out.writer_for_next_arg();
        for part in self.parts() {
            w.write_all(part.as_bytes()).expect("a command's buffer takes every write");
        }
    }
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

/// How an auto top-up's payment was settled, by payment reference (kept, as top-up receipts).
pub fn autopay(account_id: &str, payment_ref: &str) -> String {
    format!("{}:autopay:{payment_ref}", account(account_id))
}

/// An API-key record, by the hex SHA-256 of the plaintext.
pub fn api_key(hash: &str) -> String {
    format!("{PREFIX}:key:{hash}")
}

/// The hash of an API key, by the key's public id.
pub fn api_key_id(key_id: &str) -> String {
    format!("{PREFIX}:keyid:{key_id}")
}

/// An account's history entries (list, oldest first).
pub fn history(account_id: &str) -> String {
    format!("{}:history", account(account_id))
}

/// An account's usage in one period (by period index from the anchor).
pub fn usage(account_id: &str, period: i64) -> String {
    format!("{}:usage:{period}", account(account_id))
}

/// An account's outbox of undelivered events (list, oldest first).
pub fn outbox(account_id: &str) -> String {
    format!("{}:outbox", account(account_id))
}

/// The public fields of an account's API keys, by key id.
pub fn account_keys(account_id: &str) -> String {
    format!("{}:keys", account(account_id))
}

/// An account's queue of job ids (list, oldest first): its queued and running jobs.
pub fn job_queue(account_id: &str) -> String {
    format!("{}:queue", account(account_id))
}

/// A job record (hash), by job id; it expires `retention` after the job finished.
pub fn job(account_id: &str, job_id: &str) -> String {
    format!("{}:job:{job_id}", account(account_id))
}

/// How many sets the outbox index is split into.
pub const OUTBOX_SHARDS: u32 = 16;

/// One shard of the outbox index (`shard` < [`OUTBOX_SHARDS`]).
pub fn outbox_index_shard(shard: u32) -> String {
    format!("{PREFIX}:outbox:index:{shard}")
}

/// The outbox index shard an account belongs to: FNV-1a of its id, a hash fixed here (not
/// `std`'s, which may change between Rust releases) so every gateway version agrees.
pub fn outbox_index(account_id: &str) -> String {
    outbox_index_shard(fnv1a(account_id) % OUTBOX_SHARDS)
}

/// How many sets the job index is split into.
pub const JOB_SHARDS: u32 = 16;

/// One shard of the job index (`shard` < [`JOB_SHARDS`]).
pub fn job_index_shard(shard: u32) -> String {
    format!("{PREFIX}:jobs:index:{shard}")
}

/// The job index shard an account belongs to (FNV-1a of its id, like [`outbox_index`]).
pub fn job_index(account_id: &str) -> String {
    job_index_shard(fnv1a(account_id) % JOB_SHARDS)
}

/// How many sets the export index (accounts with entries not yet exported) is split into.
pub const EXPORT_SHARDS: u32 = 16;

/// One shard of the export index (`shard` < [`EXPORT_SHARDS`]).
pub fn export_index_shard(shard: u32) -> String {
    format!("{PREFIX}:export:index:{shard}")
}

/// The export index shard an account belongs to (FNV-1a of its id, like [`outbox_index`]).
pub fn export_index(account_id: &str) -> String {
    export_index_shard(fnv1a(account_id) % EXPORT_SHARDS)
}

/// The account id of a history key, `None` for any other key.
pub fn account_of_history(key: &str) -> Option<&str> {
    account_of(key, "}:history")
}

/// How many lists pending refunds are spread over. Each list is its own key (no hash tag), so on
/// a cluster they sit on different shards and a refund can be deferred while its account's shard
/// is down.
pub const REFUND_SHARDS: u32 = 16;

/// One list of pending refunds (`shard` < [`REFUND_SHARDS`]).
pub fn pending_refunds(shard: u32) -> String {
    format!("{PREFIX}:refunds:pending:{shard}")
}

/// The first list a charge's pending refund is tried on (FNV-1a of the charge id).
pub fn pending_refunds_shard(charge_id: &str) -> u32 {
    fnv1a(charge_id) % REFUND_SHARDS
}

/// 32-bit FNV-1a, fixed here so every gateway version shards alike.
fn fnv1a(text: &str) -> u32 {
    text.bytes().fold(0x811c_9dc5_u32, |h, b| (h ^ u32::from(b)).wrapping_mul(0x0100_0193))
}

/// The account id of an outbox key, `None` for any other key (an id never holds `}`, which would
/// end the hash tag early, so `cg:{acct:a}:topup:x}:outbox` is a top-up record, not an outbox).
pub fn account_of_outbox(key: &str) -> Option<&str> {
    account_of(key, "}:outbox")
}

/// The account id of a job queue key, `None` for any other key (as [`account_of_outbox`]:
/// `cg:{acct:a}:job:x}:queue` is a job record, not a queue).
pub fn account_of_job_queue(key: &str) -> Option<&str> {
    account_of(key, "}:queue")
}

fn account_of<'a>(key: &'a str, suffix: &str) -> Option<&'a str> {
    let id = key.strip_prefix("cg:{acct:")?.strip_suffix(suffix)?;
    (!id.is_empty() && !id.contains('}')).then_some(id)
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
        for key in [
            super::charge("acme", "c1"),
            super::idempotency("acme", "k{}"),
            super::topup("acme", "p1"),
            super::history("acme"),
            super::usage("acme", -1),
            super::outbox("acme"),
            super::account_keys("acme"),
            super::job_queue("acme"),
            super::job("acme", "j1"),
        ] {
            assert!(key.starts_with(&format!("{a}:")), "{key}");
            assert_eq!(tag(&key), tag(&a), "{key}");
        }
    }

    #[test]
    fn outbox_index_shards_are_stable_and_untagged() {
        let shards: std::collections::HashSet<String> =
            (0..1000).map(|i| super::outbox_index(&format!("acct-{i}"))).collect();
        assert_eq!(shards.len(), super::OUTBOX_SHARDS as usize, "every shard used");
        assert!(shards.iter().all(|s| !s.contains('{')), "no hash tag: shards spread over the cluster");
        assert_eq!(super::outbox_index("acme"), super::outbox_index("acme"));
    }

    #[test]
    fn job_index_shards_are_stable_and_untagged() {
        let shards: std::collections::HashSet<String> =
            (0..1000).map(|i| super::job_index(&format!("acct-{i}"))).collect();
        assert_eq!(shards.len(), super::JOB_SHARDS as usize, "every shard used");
        assert!(shards.iter().all(|s| !s.contains('{')), "no hash tag: shards spread over the cluster");
        assert!(shards.iter().all(|s| s.starts_with("cg:jobs:index:")));
    }

    #[test]
    fn job_queue_keys_name_their_account() {
        assert_eq!(super::account_of_job_queue(&super::job_queue("acme")), Some("acme"));
        assert_eq!(super::account_of_job_queue(&super::job("acme", "x}:queue")), None);
        assert_eq!(super::account_of_job_queue(&super::outbox("acme")), None);
    }

    #[test]
    fn outbox_keys_name_their_account() {
        assert_eq!(super::account_of_outbox(&super::outbox("acme")), Some("acme"));
        assert_eq!(super::account_of_outbox(&super::charge("acme", "x:outbox")), None);
        assert_eq!(super::account_of_outbox(&super::topup("acme", "p}:outbox")), None);
    }
}
