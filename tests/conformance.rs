//! One ledger conformance suite, run against every store: the embedded `memory` ledger, Redis
//! standalone and a 3-master Redis Cluster. Whatever the store, a user sees the same balances.
//!
//! Each store gets one test that starts its server, then runs [`suite`]; every check creates its
//! own uniquely named accounts, so the checks share one server and run one after the other while
//! the renewal checks (which wait 2–3 s for a real period boundary) run alongside them.
//! The suite covers the job queue ([`JobStore`]) too. Redis-only behaviour (script cache flush,
//! clock high-water mark, outbox and job index recovery, the Lua calendar against
//! `creditgate::calendar`) follows in the Redis tests, and so does a step-by-step comparison of a
//! Redis store with a memory store fed the same steps.

mod support;

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use creditgate::calendar::{Anchor, parse_rfc3339, rfc3339};
use creditgate::ledger::jobs::{EnqueueOutcome, Job, JobFinish, JobStore, JobView, NewJob};
use creditgate::ledger::redis::{RedisLedger, lua_prelude};
use creditgate::ledger::{
    AutoTopup, AutoTopupPayment, Billing, ChargeOutcome, ChargeRequest, Event, FreeOutcome, HistoryEntry, IdemHit,
    Idempotency, KeyRecord, Ledger, MemoryLedger, NewAccount, Packages, PendingRefund, PlanChange, PlanOutcome,
    Receipt, RefundOutcome, Role, Settlement, StoreLimits, StoredResponse, TopupOutcome, TopupRequest, keys,
};
use serde_json::json;
use support::redis::{RedisCluster, RedisServer, state};

// === the stores ===

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn memory() {
    suite(Arc::new(MemoryLedger::new())).await;
    // Limits are per store: a store of its own, so they do not bound the suite's accounts.
    history_and_outbox_stay_bounded(&MemoryLedger::new()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_standalone() {
    let server = RedisServer::start();
    let ledger = Arc::new(RedisLedger::connect_standalone(&server.url()).await.expect("connect"));
    tokio::join!(suite(ledger.clone()), same_steps_as_memory(&ledger));
    history_and_outbox_stay_bounded(&RedisLedger::connect_standalone(&server.url()).await.unwrap()).await;
    let redis = |args: &[&str]| server.command(args);
    clock_never_goes_back(&ledger, redis).await;
    a_record_of_the_previous_layout_is_refunded(&ledger, redis).await;
    the_layout_before_state_is_read_and_moved(&ledger, redis).await;
    a_charge_entry_written_before_reads_the_same(&ledger, redis).await;
    export_sweep_counts_what_is_left(&RedisLedger::connect_standalone(&server.url()).await.unwrap(), redis).await;
    records_are_found_across_a_bucket_boundary(&RedisLedger::connect_standalone(&server.url()).await.unwrap()).await;
    outbox_index_recovers(&ledger, redis).await;
    job_index_recovers_and_finished_jobs_expire(&ledger, redis).await;
    survives_a_function_library_flush(&ledger, || {
        server.command(&["FUNCTION", "FLUSH"]);
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn redis_cluster() {
    let cluster = RedisCluster::start();
    let ledger = Arc::new(RedisLedger::connect_cluster(&cluster.urls()).await.expect("connect"));
    history_and_outbox_stay_bounded(&RedisLedger::connect_cluster(&cluster.urls()).await.unwrap()).await;
    // Raw commands go to the node serving the key's slot (the others answer MOVED); an EVAL's
    // key follows the script and the key count.
    let on_owner = |args: &[&str]| {
        let key = if args[0] == "EVAL" { args[3] } else { args[1] };
        let slot: u32 = cluster.nodes()[0].command(&["CLUSTER", "KEYSLOT", key]).parse().unwrap();
        let owner = cluster.nodes().iter().find(|n| serves_slot(n, slot)).expect("some node serves the slot");
        owner.command(args)
    };
    tokio::join!(suite(ledger.clone()), same_steps_as_memory(&ledger));
    let holding = cluster.nodes().iter().filter(|n| n.command(&["DBSIZE"]) != "0").count();
    assert!(holding >= 2, "the accounts should spread over the shards, {holding} of 3 hold keys");
    clock_never_goes_back(&ledger, on_owner).await;
    outbox_index_recovers(&ledger, on_owner).await;
    job_index_recovers_and_finished_jobs_expire(&ledger, on_owner).await;
    survives_a_function_library_flush(&ledger, || {
        for node in cluster.nodes() {
            node.command(&["FUNCTION", "FLUSH"]);
        }
    })
    .await;
}

/// Whether a cluster node serves `slot`, from the slot ranges on its own `CLUSTER NODES` line.
fn serves_slot(node: &RedisServer, slot: u32) -> bool {
    let nodes = node.command(&["CLUSTER", "NODES"]);
    let myself = nodes.lines().find(|l| l.contains("myself")).expect("a myself line");
    myself.split_whitespace().skip(8).any(|range| match range.split_once('-') {
        Some((a, b)) => (a.parse::<u32>().unwrap()..=b.parse().unwrap()).contains(&slot),
        None => range.parse::<u32>() == Ok(slot),
    })
}

// === the suite ===

/// Every check of the ledger and job queue contracts, against one store.
async fn suite<L: Ledger + JobStore>(l: Arc<L>) {
    tokio::join!(
        renewal_at_the_anchor(&*l),
        renewal_by_a_charge_keeps_its_history_entry(&*l),
        downgrade_at_renewal_with_entry_and_event(&*l),
        lease_expiry_and_retry_delay(&*l),
        renewal_through_a_job_step(&*l),
        async {
            all_or_nothing(&*l).await;
            monthly_first_then_topup_and_refund_per_bucket(&*l).await;
            refund_never_twice(&*l).await;
            resent_charge_id_applies_once(&*l).await;
            idempotency_replay_conflict_and_retry_after_refund(&*l).await;
            idempotency_answer_not_kept_and_lease_end(&*l).await;
            refund_of_an_unknown_charge_leaves_a_tombstone(&*l).await;
            resent_charge_keeps_its_auto_topup(&*l).await;
            saving_auto_topup_again_does_not_rearm(&*l).await;
            auto_topup_package_changed_or_removed_switches_off(&*l).await;
            queued_request_with_a_key_is_one_job(&*l).await;
            free_automatic_refreshes_counted_within_their_allowance(&*l).await;
            deferred_refunds_are_kept_until_forgotten(&*l).await;
            duplicate_topup(&*l).await;
            unknown_accounts(&*l).await;
            api_keys(&*l).await;
            list_and_revoke_keys(&*l).await;
            history_sums_to_the_balances(&*l).await;
            history_pages(&*l).await;
            plan_upgrade_now(&*l).await;
            auto_topup_once_per_crossing_and_capped(&*l).await;
            billing_details_kept_first_customer_wins(&*l).await;
            auto_topup_payment_settled_once(&*l).await;
            failed_auto_topup_payment_takes_back_only_what_is_unspent(&*l).await;
            usage_by_category_operation_and_day(&*l).await;
            events_listed_and_acknowledged(&*l).await;
            concurrent_duplicate_topups(l.clone()).await;
            concurrent_charges_never_overdraw(l.clone()).await;
            concurrent_idempotent_copies_charge_once(l.clone()).await;
            concurrent_crossing_buys_one_auto_topup(l.clone()).await;
            concurrent_thresholds_fire_once_each(l.clone()).await;
            thresholds_follow_each_charge(&*l).await;
            queue_order_cap_and_claims(&*l).await;
            a_job_of_unknown_fate_is_withdrawn_or_barred(&*l).await;
            finish_by_the_lease_holder_release_and_failure(&*l).await;
            done_keeps_the_result_for_its_account_only(&*l).await;
            concurrent_claimers_take_each_job_once(l.clone()).await;
        }
    );
}

async fn all_or_nothing(l: &impl Ledger) {
    let acct = account(l, 10).await;
    topup(l, &acct, 5).await;
    let renews_at = view(l, &acct).await.renews_at;
    assert_eq!(
        l.charge(charge(&acct, &unique("c"), 16)).await.unwrap(),
        ChargeOutcome::Refused { remaining: 15, renews_at }
    );
    let v = view(l, &acct).await;
    assert_eq!((v.monthly_remaining, v.topup_remaining, v.used_this_period), (10, 5, 0), "nothing debited");
    let r = charged(l.charge(charge(&acct, &unique("c"), 15)).await.unwrap());
    assert_eq!((r.from_monthly, r.from_topup, r.remaining()), (10, 5, 0));
    assert_eq!(
        l.charge(charge(&acct, &unique("c"), 1)).await.unwrap(),
        ChargeOutcome::Refused { remaining: 0, renews_at }
    );
}

async fn monthly_first_then_topup_and_refund_per_bucket(l: &impl Ledger) {
    let acct = account(l, 10).await;
    topup(l, &acct, 20).await;
    let r = charged(l.charge(charge(&acct, &unique("c"), 4)).await.unwrap());
    assert_eq!((r.from_monthly, r.from_topup, r.monthly_remaining, r.topup_remaining), (4, 0, 6, 20));
    let spanning = unique("c");
    let r = charged(l.charge(charge(&acct, &spanning, 10)).await.unwrap());
    assert_eq!((r.cost, r.from_monthly, r.from_topup, r.monthly_remaining, r.topup_remaining), (10, 6, 4, 0, 16));
    assert_eq!((r.charge_id.as_str(), r.allocation, r.remaining()), (spanning.as_str(), 10, 16));
    let r = charged(l.charge(charge(&acct, &unique("c"), 3)).await.unwrap());
    assert_eq!((r.from_monthly, r.from_topup, r.topup_remaining), (0, 3, 13), "top-ups only once monthly is empty");
    assert_eq!(
        l.refund(&acct, &spanning).await.unwrap(),
        RefundOutcome::Refunded { to_monthly: 6, to_topup: 4, monthly_remaining: 6, topup_remaining: 17 }
    );
    let v = view(l, &acct).await;
    assert_eq!((v.monthly_remaining, v.topup_remaining, v.used_this_period), (6, 17, 7));
}

async fn refund_never_twice(l: &impl Ledger) {
    let acct = account(l, 10).await;
    let id = unique("c");
    charged(l.charge(charge(&acct, &id, 5)).await.unwrap());
    assert!(matches!(l.refund(&acct, &id).await.unwrap(), RefundOutcome::Refunded { to_monthly: 5, .. }));
    assert_eq!(l.refund(&acct, &id).await.unwrap(), RefundOutcome::AlreadyRefunded);
    let v = view(l, &acct).await;
    assert_eq!((v.monthly_remaining, v.used_this_period), (10, 0), "refunded once");
    assert_eq!(l.refund(&acct, "never-made").await.unwrap(), RefundOutcome::UnknownCharge);
    assert_eq!(l.refund(&unique("nobody"), &id).await.unwrap(), RefundOutcome::UnknownCharge);
}

async fn resent_charge_id_applies_once(l: &impl Ledger) {
    let acct = account(l, 10).await;
    let id = unique("c");
    let first = charged(l.charge(charge(&acct, &id, 3)).await.unwrap());
    let again = charged(l.charge(charge(&acct, &id, 3)).await.unwrap());
    assert_eq!(again, first, "same receipt, nothing debited again");
    assert_eq!(view(l, &acct).await.monthly_remaining, 7);
    // After a refund, a late copy of the step answers its own outcome and charges nothing.
    l.refund(&acct, &id).await.unwrap();
    assert_eq!(l.charge(charge(&acct, &id, 3)).await.unwrap(), ChargeOutcome::Refunded);
    let v = view(l, &acct).await;
    assert_eq!((v.monthly_remaining, v.used_this_period), (10, 0));
    // With no credits left a known id still answers what it is, not a refusal: a copy of the
    // step that took the last credits its receipt, an id refunded before (here a tombstone) that.
    let last = unique("c");
    let all = charged(l.charge(charge(&acct, &last, 10)).await.unwrap());
    assert_eq!(charged(l.charge(charge(&acct, &last, 10)).await.unwrap()), all, "re-sent at zero credits");
    let barred = unique("c");
    assert_eq!(l.refund(&acct, &barred).await.unwrap(), RefundOutcome::UnknownCharge);
    assert_eq!(l.charge(charge(&acct, &barred, 3)).await.unwrap(), ChargeOutcome::Refunded);
    let v = view(l, &acct).await;
    assert_eq!((v.monthly_remaining, v.used_this_period), (0, 10));
}

/// An answer as the gateway keeps it for an idempotency key.
fn answer(body: &str) -> StoredResponse {
    StoredResponse {
        status: 200,
        headers: vec![("content-type".into(), "application/json".into()), ("x-model".into(), "m1".into())],
        body: body.as_bytes().to_vec().into(),
    }
}

async fn idempotency_replay_conflict_and_retry_after_refund(l: &impl Ledger) {
    let acct = account(l, 10).await;
    let key = unique("idem");
    let same = Idempotency { key: &key, fingerprint: "f1", lease_secs: 600 };
    let other = Idempotency { key: &key, fingerprint: "f2", lease_secs: 600 };
    let first_id = unique("c");
    charged(l.charge(ChargeRequest { idempotency: Some(same), ..charge(&acct, &first_id, 2) }).await.unwrap());
    // While the first runs, a copy learns so and is not charged.
    let copy = l.charge(ChargeRequest { idempotency: Some(same), ..charge(&acct, &unique("c"), 2) }).await.unwrap();
    let ChargeOutcome::Idempotent(IdemHit::InProgress { retry_after_secs }) = copy else { panic!("{copy:?}") };
    assert!((599..=600).contains(&retry_after_secs), "{retry_after_secs}");
    let conflict = l.charge(ChargeRequest { idempotency: Some(other), ..charge(&acct, &unique("c"), 2) }).await;
    assert_eq!(conflict.unwrap(), ChargeOutcome::Idempotent(IdemHit::Conflict));
    // Its answer is kept once; every repeat gets exactly it.
    let body = "{\"answer\":\"\u{e9}t\u{e9}\"}\n\0binary";
    assert!(l.complete_idempotent(&acct, &key, &first_id, Some(&answer(body))).await.unwrap());
    assert!(!l.complete_idempotent(&acct, &key, &first_id, None).await.unwrap(), "kept once");
    assert!(!l.complete_idempotent(&acct, &key, &unique("c"), None).await.unwrap(), "only by its own charge");
    let replay = l.charge(ChargeRequest { idempotency: Some(same), ..charge(&acct, &unique("c"), 2) }).await.unwrap();
    let expected = IdemHit::Replay { response: answer(body), remaining: 8, allocation: 10 };
    assert_eq!(replay, ChargeOutcome::Idempotent(expected.clone()));
    let conflict = l.charge(ChargeRequest { idempotency: Some(other), ..charge(&acct, &unique("c"), 2) }).await;
    assert_eq!(conflict.unwrap(), ChargeOutcome::Idempotent(IdemHit::Conflict));
    assert_eq!(view(l, &acct).await.monthly_remaining, 8, "charged once");

    // A refunded request was not served: a retry under the same key pays anew.
    let key2 = unique("idem");
    let second = Idempotency { key: &key2, fingerprint: "f1", lease_secs: 600 };
    let refunded_id = unique("c");
    charged(l.charge(ChargeRequest { idempotency: Some(second), ..charge(&acct, &refunded_id, 2) }).await.unwrap());
    l.refund(&acct, &refunded_id).await.unwrap();
    assert!(!l.complete_idempotent(&acct, &key2, &refunded_id, None).await.unwrap(), "the key was released");
    let retry_id = unique("c");
    let retry =
        charged(l.charge(ChargeRequest { idempotency: Some(second), ..charge(&acct, &retry_id, 2) }).await.unwrap());
    assert_eq!((retry.charge_id.as_str(), retry.monthly_remaining), (retry_id.as_str(), 6));
}

/// An answer not kept (too large, the client left) or a first request whose lease ran out (its
/// instance died): the charge stands and the key answers "reused", never a free run.
async fn idempotency_answer_not_kept_and_lease_end(l: &impl Ledger) {
    let acct = account(l, 10).await;
    let key = unique("idem");
    let idem = Idempotency { key: &key, fingerprint: "f", lease_secs: 600 };
    let id = unique("c");
    charged(l.charge(ChargeRequest { idempotency: Some(idem), ..charge(&acct, &id, 2) }).await.unwrap());
    assert!(l.complete_idempotent(&acct, &key, &id, None).await.unwrap());
    let repeat = l.charge(ChargeRequest { idempotency: Some(idem), ..charge(&acct, &unique("c"), 2) }).await.unwrap();
    assert_eq!(repeat, ChargeOutcome::Idempotent(IdemHit::Reused));

    let key = unique("idem");
    let expired = Idempotency { key: &key, fingerprint: "f", lease_secs: 0 };
    charged(l.charge(ChargeRequest { idempotency: Some(expired), ..charge(&acct, &unique("c"), 2) }).await.unwrap());
    let repeat = l.charge(ChargeRequest { idempotency: Some(idem), ..charge(&acct, &unique("c"), 2) }).await.unwrap();
    assert_eq!(repeat, ChargeOutcome::Idempotent(IdemHit::Reused), "its lease ended without an answer");
    assert_eq!(view(l, &acct).await.monthly_remaining, 6);
}

/// A refund that overtakes its charge (the charge's reply was lost, its fate unknown) leaves a
/// tombstone: the charge, arriving late, is refused and debits nothing.
async fn refund_of_an_unknown_charge_leaves_a_tombstone(l: &impl Ledger) {
    let acct = account(l, 10).await;
    let id = unique("c");
    assert_eq!(l.refund(&acct, &id).await.unwrap(), RefundOutcome::UnknownCharge);
    assert_eq!(l.charge(charge(&acct, &id, 3)).await.unwrap(), ChargeOutcome::Refunded);
    assert_eq!(l.refund(&acct, &id).await.unwrap(), RefundOutcome::AlreadyRefunded);
    let v = view(l, &acct).await;
    assert_eq!((v.monthly_remaining, v.used_this_period), (10, 0));
    assert_eq!(l.history(&acct, None, 10).await.unwrap().unwrap().len(), 1, "only the account's creation");
}

/// A re-sent charge answers the receipt of the step it repeats, auto top-up included.
async fn resent_charge_keeps_its_auto_topup(l: &impl Ledger) {
    let acct = account(l, 100).await;
    assert!(l.set_auto_topup(&acct, &auto_setting(true, 50, 200)).await.unwrap());
    let id = unique("c");
    let first = charged(l.charge(charge(&acct, &id, 60)).await.unwrap());
    assert_eq!(first.auto_topup, Some(200));
    let again = charged(l.charge(charge(&acct, &id, 60)).await.unwrap());
    assert_eq!(again, first);
    assert_eq!(view(l, &acct).await.remaining(), 240, "bought once");
}

/// Saving an enabled auto top-up again while below its threshold does not buy again: only
/// switching it on (off → on) arms it.
async fn saving_auto_topup_again_does_not_rearm(l: &impl Ledger) {
    let acct = account(l, 100).await;
    charged(l.charge(charge(&acct, &unique("c"), 80)).await.unwrap());
    // Below the threshold even after a purchase: 20 → 19 + 50 = 69 < 100.
    let on = auto_setting(true, 100, 50);
    assert!(l.set_auto_topup(&acct, &on).await.unwrap());
    let r = charged(l.charge(charge(&acct, &unique("c"), 1)).await.unwrap());
    assert_eq!((r.auto_topup, r.remaining()), (Some(50), 69), "switched on below the threshold: armed once");
    for _ in 0..3 {
        assert!(l.set_auto_topup(&acct, &on).await.unwrap());
        let r = charged(l.charge(charge(&acct, &unique("c"), 1)).await.unwrap());
        assert_eq!(r.auto_topup, None, "saved again while on: not re-armed");
    }
    assert!(l.set_auto_topup(&acct, &auto_setting(false, 100, 50)).await.unwrap());
    assert!(l.set_auto_topup(&acct, &on).await.unwrap());
    let r = charged(l.charge(charge(&acct, &unique("c"), 1)).await.unwrap());
    assert_eq!(r.auto_topup, Some(50), "off → on arms again");
    assert_eq!(view(l, &acct).await.auto_topups_this_period, 2);
}

/// An auto top-up buys its package only as the running config still defines it; a package whose
/// credits or price changed, or that is gone, switches the setting off with an event instead.
async fn auto_topup_package_changed_or_removed_switches_off(l: &impl Ledger) {
    for (packages, reason) in [
        (Packages::new(vec![("p200".into(), 250, 10.0)]), "package_changed"),
        (Packages::new(vec![("p200".into(), 200, 12.0)]), "package_changed"),
        (Packages::new(vec![("p50".into(), 50, 10.0)]), "package_removed"),
    ] {
        let acct = account(l, 100).await;
        assert!(l.set_auto_topup(&acct, &auto_setting(true, 50, 200)).await.unwrap());
        let r =
            charged(l.charge(ChargeRequest { packages: &packages, ..charge(&acct, &unique("c"), 60) }).await.unwrap());
        assert_eq!((r.auto_topup, r.remaining()), (None, 40), "{reason}: nothing bought");
        let v = view(l, &acct).await;
        assert_eq!(v.auto_topup.map(|a| a.enabled), Some(false), "{reason}: switched off");
        let events = l.pending_events(&acct, 100).await.unwrap();
        let off: Vec<_> = events.iter().filter(|e| e.kind == "auto_topup.disabled").collect();
        assert_eq!(off.len(), 1, "{events:?}");
        assert_eq!(off[0].data, json!({"package": "p200", "reason": reason}));
        let r = charged(l.charge(charge(&acct, &unique("c"), 30)).await.unwrap());
        assert_eq!(r.auto_topup, None, "stays off");
    }
}

/// Free automatic refreshes are counted per operation in the period's usage (not in credits),
/// and past an allowance they are not free.
async fn free_automatic_refreshes_counted_within_their_allowance(l: &impl Ledger) {
    let acct = account(l, 10).await;
    let op = "lead_scoring_refresh";
    assert_eq!(l.count_free_automatic(&acct, op, None, None).await.unwrap(), FreeOutcome::Free { count: 1 });
    assert_eq!(l.count_free_automatic(&acct, op, None, None).await.unwrap(), FreeOutcome::Free { count: 2 });
    assert_eq!(l.count_free_automatic(&acct, op, Some(3), None).await.unwrap(), FreeOutcome::Free { count: 3 });
    assert_eq!(l.count_free_automatic(&acct, op, Some(3), None).await.unwrap(), FreeOutcome::OverCap);
    assert_eq!(l.count_free_automatic(&acct, "other_op", Some(1), None).await.unwrap(), FreeOutcome::Free { count: 1 });
    let u = l.usage(&acct, 0).await.unwrap().unwrap().current;
    let expected: BTreeMap<String, u64> = [(op.to_owned(), 3), ("other_op".to_owned(), 1)].into();
    assert_eq!((u.free_automatic, u.total), (expected, 0));
    assert_eq!(view(l, &acct).await.remaining(), 10, "no credits moved");
    assert_eq!(l.count_free_automatic(&unique("nobody"), op, None, None).await.unwrap(), FreeOutcome::NoAccount);
}

/// A refund deferred to the store is listed for every instance until one forgets it.
async fn deferred_refunds_are_kept_until_forgotten(l: &impl Ledger) {
    let deferred =
        PendingRefund { account: unique("acct"), charge_id: unique("c"), category: "AI Chat".into(), slot: 0 };
    l.defer_refund(&deferred).await.unwrap();
    let mine = |all: Vec<PendingRefund>| -> Vec<PendingRefund> {
        all.into_iter().filter(|p| p.charge_id == deferred.charge_id).collect()
    };
    let found = mine(l.pending_refunds(1000).await.unwrap());
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!((&found[0].account, &found[0].category), (&deferred.account, &deferred.category));
    l.forget_refund(&found[0]).await.unwrap();
    assert!(mine(l.pending_refunds(1000).await.unwrap()).is_empty(), "forgotten");
}

/// `history.max_entries` and `notifications.max_outbox_per_account`: the oldest entries and
/// undelivered events go in the step that appends, the paging and the balances stay exact, and
/// dropped events are counted.
async fn history_and_outbox_stay_bounded(l: &(impl Ledger + JobStore)) {
    queued_bytes_and_age_stay_bounded(l).await;
    l.set_limits(StoreLimits {
        history_max_entries: 5,
        history_exported_only: false,
        outbox_max_events: 3,
        ..Default::default()
    });
    let acct = account(l, 100).await;
    for _ in 0..12 {
        charged(l.charge(charge(&acct, &unique("c"), 1)).await.unwrap());
    }
    let kept = l.history(&acct, None, 100).await.unwrap().unwrap();
    let seqs: Vec<u64> = kept.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, [13, 12, 11, 10, 9], "created + 12 charges, the newest 5 kept");
    let page = l.history(&acct, Some(11), 100).await.unwrap().unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [10, 9]);
    // The balance still reconciles: the oldest kept entry carries the opening balance forward.
    let oldest = kept.last().unwrap();
    let opening = (oldest.monthly_after as i64 - oldest.monthly_delta, oldest.topup_after as i64 - oldest.topup_delta);
    let deltas: (i64, i64) = kept.iter().fold((0, 0), |(m, t), e| (m + e.monthly_delta, t + e.topup_delta));
    let v = view(l, &acct).await;
    assert_eq!((opening.0 + deltas.0, opening.1 + deltas.1), (v.monthly_remaining as i64, v.topup_remaining as i64));
    assert_eq!(opening, (93, 0), "before the 8th charge, the oldest kept");
    // Five top-ups raise five events; the outbox keeps the newest three.
    let _ = l.take_dropped_events();
    for _ in 0..5 {
        topup(l, &acct, 1).await;
    }
    let events = l.pending_events(&acct, 100).await.unwrap();
    assert_eq!(events.len(), 3);
    assert_eq!(events[2].data["topup_remaining"], 5, "the newest kept");
    assert_eq!(l.take_dropped_events(), 2);
    // With export on, only exported entries may go: nothing is exported here, so all stay.
    l.set_limits(StoreLimits {
        history_max_entries: 5,
        history_exported_only: true,
        outbox_max_events: 3,
        ..Default::default()
    });
    for _ in 0..3 {
        charged(l.charge(charge(&acct, &unique("c"), 1)).await.unwrap());
    }
    assert_eq!(l.history(&acct, None, 100).await.unwrap().unwrap().len(), 5 + 3, "kept until exported");
    // A cap of 64: the Redis list drops trimmed entries 4 at a time (StoreLimits::history_trim_batch);
    // readers see exactly the newest 64 after every charge, pages included.
    let limits = StoreLimits { history_max_entries: 64, ..Default::default() };
    assert_eq!(limits.history_trim_batch(), 4);
    l.set_limits(limits);
    let acct = account(l, 1000).await;
    for i in 1..=70u64 {
        charged(l.charge(charge(&acct, &unique("c"), 1)).await.unwrap());
        let kept = l.history(&acct, None, 1000).await.unwrap().unwrap();
        let newest = i + 1;
        assert_eq!(kept.len() as u64, newest.min(64), "after charge {i}");
        assert_eq!((kept[0].seq, kept.last().unwrap().seq), (newest, newest.saturating_sub(63).max(1)), "after {i}");
    }
    let page = l.history(&acct, Some(10), 100).await.unwrap().unwrap();
    assert_eq!(page.iter().map(|e| e.seq).collect::<Vec<_>>(), [9, 8], "the page stops at the oldest shown");
    let kept = l.history(&acct, None, 1000).await.unwrap().unwrap();
    let oldest = kept.last().unwrap();
    let opening = oldest.monthly_after as i64 - oldest.monthly_delta;
    let sum: i64 = kept.iter().map(|e| e.monthly_delta).sum();
    assert_eq!(opening + sum, view(l, &acct).await.monthly_remaining as i64);
}

/// `jobs.max_queued_bytes_per_account` counts the bodies of waiting and running jobs (given back
/// when a job ends); `jobs.max_queue_age_hours` expires jobs that waited too long, unrun.
async fn queued_bytes_and_age_stay_bounded(l: &(impl Ledger + JobStore)) {
    let acct = account(l, 10).await;
    let headers = job_headers();
    let body = [b'x'; 400];
    fn limited<'a>(acct: &'a str, id: &'a str, headers: &'a [(String, String)], body: &'a [u8]) -> NewJob<'a> {
        NewJob { max_queued_bytes: 1000, ..new_job(acct, id, headers, body, 100) }
    }
    let job = |id| limited(&acct, id, &headers, &body);
    let (a, b, c) = (unique("job"), unique("job"), unique("job"));
    assert_eq!(l.enqueue_job(job(&a)).await.unwrap(), EnqueueOutcome::Queued { depth: 1 });
    assert_eq!(l.enqueue_job(job(&b)).await.unwrap(), EnqueueOutcome::Queued { depth: 2 });
    assert_eq!(l.enqueue_job(job(&c)).await.unwrap(), EnqueueOutcome::FullBytes, "800 + 400 > 1000");
    // A finished job gives its bytes back.
    let claimed = l.claim_job(&acct, "r1", 60).await.unwrap().expect("a job");
    let done = JobFinish::Done { status: 200, headers: vec![], body: b"ok".to_vec(), retention_secs: 60 };
    assert!(l.finish_job(&acct, &claimed.id, "r1", done).await.unwrap());
    assert_eq!(l.enqueue_job(job(&c)).await.unwrap(), EnqueueOutcome::Queued { depth: 2 });
    // With an age limit of 0 every waiting job has waited too long: they expire, unrun, and
    // their bytes come back.
    l.set_limits(StoreLimits { job_max_age_secs: 0, ..Default::default() });
    assert_eq!(l.claim_job(&acct, "r1", 60).await.unwrap(), None);
    assert_eq!(l.queue_depth(&acct).await.unwrap(), 0);
    let expired = l.job(&acct, &b).await.unwrap().expect("kept for its client");
    assert_eq!(expired.status, "expired");
    assert!(expired.error.unwrap().contains("not run within"));
    l.set_limits(StoreLimits::default());
    let (d, e) = (unique("job"), unique("job"));
    assert_eq!(l.enqueue_job(job(&d)).await.unwrap(), EnqueueOutcome::Queued { depth: 1 });
    assert_eq!(l.enqueue_job(job(&e)).await.unwrap(), EnqueueOutcome::Queued { depth: 2 }, "the bytes came back");
}

/// A queued request with an idempotency key is one job: a repeat replays the 202, byte for byte.
async fn queued_request_with_a_key_is_one_job(l: &(impl Ledger + JobStore)) {
    let acct = account(l, 10).await;
    let key = unique("idem");
    let idem = Idempotency { key: &key, fingerprint: "f", lease_secs: 600 };
    let headers = job_headers();
    let (first_id, second_id) = (unique("job"), unique("job"));
    let first = NewJob { idempotency: Some(idem), ..new_job(&acct, &first_id, &headers, b"{}", 100) };
    assert_eq!(l.enqueue_job(first).await.unwrap(), EnqueueOutcome::Queued { depth: 1 });
    let again = NewJob { idempotency: Some(idem), ..new_job(&acct, &second_id, &headers, b"{}", 100) };
    let expected = creditgate::ledger::jobs::queued_response(&first_id, 1);
    assert_eq!(
        l.enqueue_job(again.clone()).await.unwrap(),
        EnqueueOutcome::Idempotent(IdemHit::Replay { response: expected.clone(), remaining: 10, allocation: 10 })
    );
    // The same key on the charge path (the account can pay now) replays the 202 too.
    let charge_copy = l.charge(ChargeRequest { idempotency: Some(idem), ..charge(&acct, &unique("c"), 2) }).await;
    assert_eq!(
        charge_copy.unwrap(),
        ChargeOutcome::Idempotent(IdemHit::Replay { response: expected, remaining: 10, allocation: 10 })
    );
    assert_eq!(l.queue_depth(&acct).await.unwrap(), 1);
    assert_eq!(l.job(&acct, &second_id).await.unwrap(), None, "no second job");
}

async fn duplicate_topup(l: &impl Ledger) {
    let acct = account(l, 10).await;
    let payment = unique("pay");
    let req = TopupRequest { account: &acct, credits: 200, payment_ref: &payment, package: Some("200") };
    let TopupOutcome::Created(first) = l.topup(req).await.unwrap() else { panic!("first top-up not created") };
    assert_eq!((first.credits, first.package.as_deref(), first.topup_remaining), (200, Some("200"), 200));
    assert!(first.created_at.abs_diff(now()) <= 2, "created_at is now");
    assert_eq!(l.topup(req).await.unwrap(), TopupOutcome::Duplicate(first.clone()));
    assert_eq!(view(l, &acct).await.topup_remaining, 200, "credited once");
    // Payment references are unique per account (README): another account's payment may carry
    // the same reference and is credited on its own.
    let other = account(l, 10).await;
    let same_ref = TopupRequest { account: &other, ..req };
    assert!(matches!(l.topup(same_ref).await.unwrap(), TopupOutcome::Created(_)));
    assert_eq!(view(l, &other).await.topup_remaining, 200);
    let grant = TopupRequest { account: &acct, credits: 50, payment_ref: &unique("pay"), package: None };
    let TopupOutcome::Created(second) = l.topup(grant).await.unwrap() else { panic!("second top-up not created") };
    assert_eq!((second.package, second.topup_remaining), (None, 250));
}

async fn unknown_accounts(l: &impl Ledger) {
    let nobody = unique("nobody");
    assert_eq!(l.account(&nobody).await.unwrap(), None);
    assert_eq!(l.charge(charge(&nobody, "c", 1)).await.unwrap(), ChargeOutcome::NoAccount);
    let req = TopupRequest { account: &nobody, credits: 1, payment_ref: "p", package: None };
    assert_eq!(l.topup(req).await.unwrap(), TopupOutcome::NoAccount);
    assert_eq!(l.account(&nobody).await.unwrap(), None, "nothing created on the way");

    let acct = account(l, 10).await;
    let again = NewAccount { id: acct.clone(), plan: "pro".into(), allocation: 2000, anchor: now(), email: None };
    assert!(!l.create_account(again).await.unwrap(), "an id is created once");
    let v = view(l, &acct).await;
    assert_eq!((v.plan.as_str(), v.allocation, v.email.as_deref()), ("test", 10, Some("ops@example.com")));
}

async fn api_keys(l: &impl Ledger) {
    let acct = account(l, 10).await;
    let record = KeyRecord {
        key_id: unique("key"),
        account: acct.clone(),
        role: Role::System,
        hash: unique("hash"),
        prefix: "cg_abcd".into(),
        created_at: now(),
    };
    assert!(l.create_key(record.clone()).await.unwrap());
    assert_eq!(l.find_key(&record.hash).await.unwrap(), Some(record.clone()));
    assert_eq!(l.find_key(&unique("hash")).await.unwrap(), None);
    let orphan = KeyRecord { account: unique("nobody"), hash: unique("hash"), ..record };
    assert!(!l.create_key(orphan.clone()).await.unwrap(), "no key without an account");
    assert_eq!(l.find_key(&orphan.hash).await.unwrap(), None);
    l.ping().await.unwrap();
}

async fn concurrent_duplicate_topups<L: Ledger>(l: Arc<L>) {
    let acct = account(&*l, 10).await;
    let payment = unique("pay");
    let outcomes = concurrently(20, |_| {
        let (l, acct, payment) = (l.clone(), acct.clone(), payment.clone());
        async move {
            let req = TopupRequest { account: &acct, credits: 100, payment_ref: &payment, package: None };
            l.topup(req).await.unwrap()
        }
    })
    .await;
    let created: Vec<_> =
        outcomes.iter().filter_map(|o| if let TopupOutcome::Created(r) = o { Some(r) } else { None }).collect();
    assert_eq!(created.len(), 1, "one payment credits once: {outcomes:?}");
    for o in &outcomes {
        if let TopupOutcome::Duplicate(r) = o {
            assert_eq!(r, created[0], "duplicates return the original receipt");
        }
    }
    assert_eq!(view(&*l, &acct).await.topup_remaining, 100);
}

async fn concurrent_charges_never_overdraw<L: Ledger>(l: Arc<L>) {
    let acct = account(&*l, 50).await;
    let outcomes = concurrently(200, |i| {
        let (l, acct) = (l.clone(), acct.clone());
        async move { l.charge(charge(&acct, &format!("c{i}"), 1)).await.unwrap() }
    })
    .await;
    let remaining: HashSet<u64> = outcomes
        .iter()
        .filter_map(|o| if let ChargeOutcome::Charged(r) = o { Some(r.remaining()) } else { None })
        .collect();
    let refused = outcomes.iter().filter(|o| matches!(o, ChargeOutcome::Refused { remaining: 0, .. })).count();
    assert_eq!((remaining.len(), refused), (50, 150), "exactly 50 charged, each seeing its own balance");
    assert_eq!(remaining, (0..50).collect());
    let v = view(&*l, &acct).await;
    assert_eq!((v.remaining(), v.used_this_period), (0, 50));
}

async fn concurrent_idempotent_copies_charge_once<L: Ledger>(l: Arc<L>) {
    let acct = account(&*l, 50).await;
    let key = unique("idem");
    let outcomes = concurrently(20, |i| {
        let (l, acct, key) = (l.clone(), acct.clone(), key.clone());
        async move {
            let idempotency = Some(Idempotency { key: &key, fingerprint: "f", lease_secs: 600 });
            l.charge(ChargeRequest { idempotency, ..charge(&acct, &format!("c{i}"), 3) }).await.unwrap()
        }
    })
    .await;
    let charged = outcomes.iter().filter(|o| matches!(o, ChargeOutcome::Charged(_))).count();
    let waiting =
        outcomes.iter().filter(|o| matches!(o, ChargeOutcome::Idempotent(IdemHit::InProgress { .. }))).count();
    assert_eq!((charged, waiting), (1, 19), "{outcomes:?}");
    assert_eq!(view(&*l, &acct).await.monthly_remaining, 47);
}

/// An account whose next period starts 2–3 s from now: spend into top-ups, cross the boundary,
/// see the monthly bucket reset (no roll-over), top-ups kept, and a refund from the old period
/// return only its top-up part.
async fn renewal_at_the_anchor(l: &impl Ledger) {
    let anchor = now() + 3; // whole seconds: 2 to 3 s from now
    let acct = unique("acct");
    let new = NewAccount { id: acct.clone(), plan: "free".into(), allocation: 50, anchor, email: None };
    assert!(l.create_account(new).await.unwrap());
    let a = Anchor::from_unix(anchor);
    let v = view(l, &acct).await;
    assert_eq!(
        (v.period_start, v.renews_at),
        (a.period_start(-1), anchor),
        "created in the period ending at the anchor"
    );
    topup(l, &acct, 30).await;
    let small = unique("c");
    charged(l.charge(charge(&acct, &small, 10)).await.unwrap());
    let spanning = unique("c");
    let r = charged(l.charge(charge(&acct, &spanning, 45)).await.unwrap());
    assert_eq!(
        (r.from_monthly, r.from_topup, r.monthly_remaining, r.topup_remaining, r.renews_at),
        (40, 5, 0, 25, anchor)
    );
    assert!(now() < anchor, "the setup took too long to test a renewal");

    sleep_until(anchor).await;
    let v = view(l, &acct).await;
    assert_eq!((v.monthly_remaining, v.topup_remaining, v.used_this_period), (50, 25, 0), "reset, no roll-over");
    assert_eq!((v.period_start, v.renews_at), (anchor, a.period_start(1)));
    assert_eq!(
        l.refund(&acct, &spanning).await.unwrap(),
        RefundOutcome::Refunded { to_monthly: 0, to_topup: 5, monthly_remaining: 50, topup_remaining: 30 }
    );
    assert!(matches!(
        l.refund(&acct, &small).await.unwrap(),
        RefundOutcome::Refunded { to_monthly: 0, to_topup: 0, .. }
    ));
    let r = charged(l.charge(charge(&acct, &unique("c"), 5)).await.unwrap());
    assert_eq!((r.monthly_remaining, r.renews_at), (45, a.period_start(1)));
    let v = view(l, &acct).await;
    assert_eq!((v.monthly_remaining, v.used_this_period), (45, 5), "renewed once, not again");
}

/// A renewal that a charge brings about (the first step after the anchor is a charge, not a
/// read) writes its own history entry and event before the charge's: the history stays
/// contiguous and sums to the balances.
async fn renewal_by_a_charge_keeps_its_history_entry(l: &impl Ledger) {
    let anchor = now() + 3;
    let acct = unique("acct");
    let new = NewAccount { id: acct.clone(), plan: "free".into(), allocation: 50, anchor, email: None };
    assert!(l.create_account(new).await.unwrap());
    charged(l.charge(charge(&acct, &unique("c"), 10)).await.unwrap());
    assert!(now() < anchor, "the setup took too long to test a renewal");
    sleep_until(anchor).await;
    let r = charged(l.charge(charge(&acct, &unique("c"), 4)).await.unwrap());
    assert_eq!(r.monthly_remaining, 46, "renewed, then charged");
    let mut history = l.history(&acct, None, 100).await.unwrap().expect("account exists");
    history.reverse();
    let steps: Vec<(u64, &str, i64)> = history.iter().map(|e| (e.seq, e.kind.as_str(), e.monthly_delta)).collect();
    assert_eq!(steps, [(1, "created", 50), (2, "charge", -10), (3, "renewal", 10), (4, "charge", -4)]);
    let events = l.pending_events(&acct, 100).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.kind == "credits.renewed").count(), 1, "{events:?}");
}

// === accounts, history, auto top-up, usage, events ===

/// Keys listed oldest first (ties by key id), never across accounts; a revoked key is gone from
/// the list and from `find_key`, and revoking it again finds nothing.
async fn list_and_revoke_keys(l: &impl Ledger) {
    let acct = account(l, 10).await;
    let other = account(l, 10).await;
    let t = now();
    let key = |key_id: &str, created_at: i64, role: Role| KeyRecord {
        key_id: key_id.to_owned(),
        account: acct.clone(),
        role,
        hash: unique("hash"),
        prefix: "cg_abcd".into(),
        created_at,
    };
    let (b, a, c) = (
        key(&unique("kb"), t - 10, Role::User),
        key(&unique("ka"), t - 20, Role::System),
        key(&unique("kc"), t - 10, Role::User),
    );
    for k in [&b, &a, &c] {
        assert!(l.create_key(k.clone()).await.unwrap());
    }
    assert!(l.create_key(KeyRecord { account: other.clone(), ..key(&unique("kx"), t, Role::User) }).await.unwrap());
    let mut same_second = [b.clone(), c.clone()];
    same_second.sort_by(|x, y| x.key_id.cmp(&y.key_id));
    let want = vec![a.clone(), same_second[0].clone(), same_second[1].clone()];
    assert_eq!(l.list_keys(&acct).await.unwrap(), want, "oldest first, then by key id");

    assert_eq!(l.revoke_key(&b.key_id).await.unwrap(), Some(b.clone()));
    assert_eq!(l.find_key(&b.hash).await.unwrap(), None, "a revoked key no longer authenticates");
    assert_eq!(l.revoke_key(&b.key_id).await.unwrap(), None, "revoked once");
    assert_eq!(l.revoke_key(&unique("never")).await.unwrap(), None);
    let left: Vec<String> = l.list_keys(&acct).await.unwrap().into_iter().map(|k| k.key_id).collect();
    assert_eq!(left, vec![a.key_id.clone(), c.key_id.clone()]);
    assert_eq!(l.find_key(&a.hash).await.unwrap(), Some(a), "the others still work");
    assert_eq!(l.list_keys(&other).await.unwrap().len(), 1);
    assert!(l.list_keys(&unique("nobody")).await.unwrap().is_empty());
}

/// A seeded random mix of charges (some refused), refunds (some twice), top-ups, plan changes and
/// auto top-up settings: the history is contiguous from 1, each entry's `*_after` is the running
/// sum of the deltas, the sums are the balances, and usage agrees with `used_this_period`.
async fn history_sums_to_the_balances(l: &impl Ledger) {
    const PLANS: [(&str, u64); 4] = [("free", 50), ("starter", 500), ("test", 100), ("small", 80)];
    const OPS: [(&str, &str); 3] =
        [("ai_chat", "AI Chat"), ("lead_enrichment", "Enrichment"), ("icebreaker", "Campaigns")];
    let acct = account(l, 100).await;
    let mut rng = Rng(0x5eed_cafe);
    let mut charges = Vec::new();
    for _ in 0..300 {
        match rng.below(12) {
            0..=5 => {
                let (operation, category) = OPS[rng.below(3) as usize];
                let id = unique("c");
                let req = ChargeRequest {
                    operation,
                    category,
                    thresholds: &[20, 10, 0],
                    auto_topup_max_per_period: 3,
                    ..charge(&acct, &id, 1 + rng.below(40))
                };
                if let ChargeOutcome::Charged(_) = l.charge(req).await.unwrap() {
                    charges.push(id);
                }
            }
            6 | 7 if !charges.is_empty() => {
                let id = &charges[rng.below(charges.len() as u64) as usize];
                l.refund(&acct, id).await.unwrap();
            }
            8 => topup(l, &acct, 1 + rng.below(80)).await,
            9 | 10 => {
                let (plan, allocation) = PLANS[rng.below(4) as usize];
                l.update_account(&acct, Some(PlanChange { plan, allocation }), None).await.unwrap().unwrap();
            }
            _ => {
                let setting = auto_setting(rng.below(4) != 0, 20 + rng.below(60), 50);
                assert!(l.set_auto_topup(&acct, &setting).await.unwrap());
            }
        }
    }
    let v = view(l, &acct).await;
    let mut history = l.history(&acct, None, 10_000).await.unwrap().expect("account exists");
    history.reverse();
    let seqs: Vec<u64> = history.iter().map(|e| e.seq).collect();
    assert_eq!(seqs, (1..=history.len() as u64).collect::<Vec<_>>(), "seq from 1, contiguous");
    assert_eq!(
        (history[0].kind.as_str(), history[0].monthly_delta, history[0].plan.as_deref()),
        ("created", 100, Some("test"))
    );
    let (mut monthly, mut topup) = (0_i64, 0_i64);
    for e in &history {
        monthly += e.monthly_delta;
        topup += e.topup_delta;
        assert_eq!((monthly, topup), (e.monthly_after as i64, e.topup_after as i64), "running sums at {e:?}");
    }
    assert_eq!(
        (monthly, topup),
        (v.monthly_remaining as i64, v.topup_remaining as i64),
        "history sums to the balances"
    );
    let kinds: HashSet<&str> = history.iter().map(|e| e.kind.as_str()).collect();
    for kind in ["created", "charge", "refund", "topup", "auto_topup", "plan_change"] {
        assert!(kinds.contains(kind), "the mix produced no {kind} entry: {kinds:?}");
    }
    let events = l.pending_events(&acct, 10_000).await.unwrap();
    let count = |kind: &str| events.iter().filter(|e| e.kind == kind).count();
    let entries = |kind: &str| history.iter().filter(|e| e.kind == kind).count();
    assert_eq!(count("topup.completed"), entries("topup"));
    assert_eq!(count("auto_topup.purchased"), entries("auto_topup"));

    let usage = l.usage(&acct, 0).await.unwrap().expect("account exists");
    let u = &usage.current;
    assert_eq!(u.total, v.used_this_period, "usage is what the ledger charged, net of refunds");
    assert_eq!(u.by_category.values().sum::<u64>(), u.total);
    assert_eq!(u.by_operation.values().sum::<u64>(), u.total);
    assert_eq!(u.by_day.values().sum::<u64>(), u.total);
}

/// Pages of `history` (newest first, `seq < before`) put together are the whole history.
async fn history_pages(l: &impl Ledger) {
    let acct = account(l, 100).await;
    for i in 0..9 {
        charged(l.charge(charge(&acct, &unique("c"), 1 + i)).await.unwrap());
    }
    let all = l.history(&acct, None, 100).await.unwrap().unwrap();
    assert_eq!(all.len(), 10);
    assert_eq!(all.iter().map(|e| e.seq).collect::<Vec<_>>(), (1..=10).rev().collect::<Vec<_>>(), "newest first");
    let mut paged = Vec::new();
    let mut before = None;
    loop {
        let page = l.history(&acct, before, 3).await.unwrap().unwrap();
        if page.is_empty() {
            break;
        }
        assert!(page.len() <= 3);
        before = Some(page.last().unwrap().seq);
        paged.extend(page);
    }
    assert_eq!(paged, all);
    assert_eq!(l.history(&acct, Some(4), 100).await.unwrap().unwrap(), all[7..].to_vec());
    assert_eq!(l.history(&acct, Some(1), 100).await.unwrap().unwrap(), vec![]);
    assert_eq!(l.history(&acct, Some(1000), 2).await.unwrap().unwrap(), all[..2].to_vec());
    assert_eq!(l.history(&acct, None, 0).await.unwrap().unwrap(), vec![]);
    assert_eq!(l.history(&unique("nobody"), None, 10).await.unwrap(), None);
    let newest = &all[0];
    assert_eq!(
        (newest.kind.as_str(), newest.monthly_delta, newest.topup_delta, newest.monthly_after),
        ("charge", -9, 0, 100 - 45)
    );
    assert_eq!((newest.operation.as_deref(), newest.category.as_deref()), (Some("ai_chat"), Some("AI Chat")));
    assert_eq!((newest.request_id.as_deref(), newest.payment_ref.as_deref()), (Some("req"), None));
    assert!(newest.charge_id.is_some() && newest.at.abs_diff(now()) <= 2);
}

/// An upgrade is in force at once (the monthly bucket grows by the difference), the same plan
/// changes nothing, the e-mail changes on its own.
async fn plan_upgrade_now(l: &impl Ledger) {
    let acct = unique("acct");
    let new =
        NewAccount { id: acct.clone(), plan: "starter".into(), allocation: 500, anchor: now() - 86_400, email: None };
    assert!(l.create_account(new).await.unwrap());
    charged(l.charge(charge(&acct, &unique("c"), 100)).await.unwrap());
    let pro = PlanChange { plan: "pro", allocation: 2000 };
    assert_eq!(l.update_account(&acct, Some(pro), None).await.unwrap(), Some(PlanOutcome::Upgraded));
    let v = view(l, &acct).await;
    assert_eq!((v.plan.as_str(), v.allocation, v.monthly_remaining, v.pending_plan), ("pro", 2000, 1900, None));
    let e = &l.history(&acct, None, 1).await.unwrap().unwrap()[0];
    assert_eq!(
        (e.kind.as_str(), e.monthly_delta, e.monthly_after, e.plan.as_deref()),
        ("plan_change", 1500, 1900, Some("pro"))
    );
    assert_eq!(l.update_account(&acct, Some(pro), None).await.unwrap(), Some(PlanOutcome::Unchanged));
    assert_eq!(l.update_account(&acct, None, Some("new@example.com")).await.unwrap(), Some(PlanOutcome::Unchanged));
    let v = view(l, &acct).await;
    assert_eq!((v.monthly_remaining, v.email.as_deref()), (1900, Some("new@example.com")));
    assert_eq!(
        l.history(&acct, None, 10).await.unwrap().unwrap().len(),
        3,
        "no entry without a balance or plan change"
    );
    // A downgrade waits for the renewal, and going back to the current plan cancels it.
    let starter = PlanChange { plan: "starter", allocation: 500 };
    assert_eq!(l.update_account(&acct, Some(starter), None).await.unwrap(), Some(PlanOutcome::DowngradeScheduled));
    let v = view(l, &acct).await;
    assert_eq!((v.plan.as_str(), v.pending_plan.as_deref(), v.monthly_remaining), ("pro", Some("starter"), 1900));
    assert_eq!(l.update_account(&acct, Some(pro), None).await.unwrap(), Some(PlanOutcome::Unchanged));
    assert_eq!(view(l, &acct).await.pending_plan, None);
    assert_eq!(l.update_account(&unique("nobody"), Some(pro), None).await.unwrap(), None);
}

/// A downgrade waits for the renewal; the renewal writes its history entry (the monthly delta is
/// the allocation minus what was left), a `credits.renewed` event, and restarts the count of
/// auto top-ups.
async fn downgrade_at_renewal_with_entry_and_event(l: &impl Ledger) {
    let anchor = now() + 3; // whole seconds: 2 to 3 s from now
    let acct = unique("acct");
    let new = NewAccount { id: acct.clone(), plan: "pro".into(), allocation: 2000, anchor, email: None };
    assert!(l.create_account(new).await.unwrap());
    topup(l, &acct, 30).await;
    assert!(l.set_auto_topup(&acct, &auto_setting(true, 1950, 200)).await.unwrap());
    let r = charged(l.charge(ChargeRequest { thresholds: &[20], ..charge(&acct, &unique("c"), 100) }).await.unwrap());
    assert_eq!((r.auto_topup, r.monthly_remaining, r.topup_remaining), (Some(200), 1900, 230));
    let starter = PlanChange { plan: "starter", allocation: 500 };
    assert_eq!(l.update_account(&acct, Some(starter), None).await.unwrap(), Some(PlanOutcome::DowngradeScheduled));
    let v = view(l, &acct).await;
    assert_eq!(
        (v.plan.as_str(), v.allocation, v.pending_plan.as_deref(), v.monthly_remaining),
        ("pro", 2000, Some("starter"), 1900)
    );
    assert_eq!(v.auto_topups_this_period, 1);
    let e = &l.history(&acct, None, 1).await.unwrap().unwrap()[0];
    assert_eq!(
        (e.kind.as_str(), e.monthly_delta, e.topup_delta, e.plan.as_deref()),
        ("plan_change", 0, 0, Some("starter"))
    );
    assert!(now() < anchor, "the setup took too long to test a renewal");

    sleep_until(anchor).await;
    let v = view(l, &acct).await;
    let in_effect = (v.plan.as_str(), v.allocation, v.pending_plan.as_deref(), v.monthly_remaining, v.topup_remaining);
    assert_eq!(in_effect, ("starter", 500, None, 500, 230), "the downgrade applies at renewal");
    assert_eq!(v.auto_topups_this_period, 0, "the count restarts each period");
    let history = l.history(&acct, None, 100).await.unwrap().unwrap();
    let renewal = &history[0];
    assert_eq!(
        (renewal.kind.as_str(), renewal.monthly_delta, renewal.topup_delta, renewal.monthly_after, renewal.topup_after),
        ("renewal", 500 - 1900, 0, 500, 230)
    );
    assert_eq!(renewal.plan.as_deref(), Some("starter"));
    assert_eq!(history.iter().filter(|e| e.kind == "renewal").count(), 1, "renewed once");
    let events = l.pending_events(&acct, 100).await.unwrap();
    let renewed: Vec<&Event> = events.iter().filter(|e| e.kind == "credits.renewed").collect();
    assert_eq!(renewed.len(), 1, "{events:?}");
    let a = Anchor::from_unix(anchor);
    assert_eq!(
        renewed[0].data,
        json!({
            "plan": "starter", "allocation": 500, "expired_monthly": 1900, "topup_remaining": 230,
            "period_start": rfc3339(anchor), "renews_at": rfc3339(a.period_start(1)),
        })
    );
    assert_eq!(renewed[0].account_id, acct);
    assert!(renewed[0].created_at >= anchor);
    // Still once after more steps in the new period.
    charged(l.charge(charge(&acct, &unique("c"), 1)).await.unwrap());
    let events = l.pending_events(&acct, 100).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.kind == "credits.renewed").count(), 1);
}

/// The charge that takes the total from at-or-above the threshold to below it buys one package
/// (credited at once, history entry, purchase event), at most `max_per_period` times.
async fn auto_topup_once_per_crossing_and_capped(l: &impl Ledger) {
    let acct = account(l, 100).await;
    assert_eq!(view(l, &acct).await.auto_topup, None, "no setting yet");
    let setting = AutoTopup { enabled: true, threshold: 30, package: "200".into(), credits: 200, price_eur: 9.99 };
    assert!(l.set_auto_topup(&acct, &setting).await.unwrap());
    assert!(!l.set_auto_topup(&unique("nobody"), &setting).await.unwrap());
    assert_eq!(view(l, &acct).await.auto_topup, Some(setting.clone()));
    let step = async |cost: u64| {
        let id = unique("c");
        let req = ChargeRequest { auto_topup_max_per_period: 2, ..charge(&acct, &id, cost) };
        (id.clone(), charged(l.charge(req).await.unwrap()))
    };
    let (_, r) = step(60).await;
    assert_eq!((r.auto_topup, r.remaining()), (None, 40), "still at or above the threshold");
    let (crossing, r) = step(15).await;
    assert_eq!((r.auto_topup, r.monthly_remaining, r.topup_remaining), (Some(200), 25, 200), "crossed: bought once");
    assert_eq!(view(l, &acct).await.auto_topups_this_period, 1);
    let again = charged(
        l.charge(ChargeRequest { auto_topup_max_per_period: 2, ..charge(&acct, &crossing, 15) }).await.unwrap(),
    );
    assert_eq!((again.auto_topup, again.remaining()), (Some(200), 225), "a re-sent step: same receipt, no new buy");
    assert_eq!(view(l, &acct).await.auto_topups_this_period, 1);
    let (_, r) = step(5).await;
    assert_eq!((r.auto_topup, r.remaining()), (None, 220), "no new crossing");
    let entry = &l.history(&acct, None, 10).await.unwrap().unwrap()[1];
    assert_eq!(
        (entry.kind.as_str(), entry.monthly_delta, entry.topup_delta, entry.topup_after),
        ("auto_topup", 0, 200, 200)
    );
    let payment_ref = format!("auto:{crossing}");
    assert_eq!((entry.payment_ref.as_deref(), entry.package.as_deref()), (Some(payment_ref.as_str()), Some("200")));
    let (_, r) = step(200).await;
    assert_eq!((r.auto_topup, r.remaining()), (Some(200), 220), "a second crossing buys again");
    let (_, r) = step(200).await;
    assert_eq!((r.auto_topup, r.remaining()), (None, 20), "capped at 2 per period");
    assert_eq!(view(l, &acct).await.auto_topups_this_period, 2);
    let purchases: Vec<Event> =
        l.pending_events(&acct, 100).await.unwrap().into_iter().filter(|e| e.kind == "auto_topup.purchased").collect();
    assert_eq!(purchases.len(), 2);
    assert_eq!(
        purchases[0].data,
        json!({
            "package": "200", "credits": 200, "price_eur": 9.99, "payment_ref": payment_ref,
            "topup_remaining": 200, "purchases_this_period": 1,
        })
    );
    assert_eq!(purchases[1].data["purchases_this_period"], 2);
    // Disabled: no purchase, the setting kept.
    let off = AutoTopup { enabled: false, ..setting };
    assert!(l.set_auto_topup(&acct, &off).await.unwrap());
    topup(l, &acct, 100).await;
    let r = charged(l.charge(charge(&acct, &unique("c"), 100)).await.unwrap());
    assert_eq!((r.auto_topup, r.remaining()), (None, 20));
    assert_eq!(view(l, &acct).await.auto_topup, Some(off));
}

/// The payment provider's customer id: the first kept wins (two instances creating one at
/// once agree); the card is replaced and clears the failure mark.
async fn billing_details_kept_first_customer_wins(l: &impl Ledger) {
    let acct = account(l, 10).await;
    assert_eq!(l.billing(&acct).await.unwrap(), Some(Billing::default()));
    assert_eq!(l.billing(&unique("nobody")).await.unwrap(), None);
    assert_eq!(l.set_billing_customer(&unique("nobody"), "cus_x").await.unwrap(), None, "no account made");
    assert_eq!(l.billing(&unique("nobody")).await.unwrap(), None);
    assert_eq!(l.set_billing_customer(&acct, "cus_first").await.unwrap().as_deref(), Some("cus_first"));
    assert_eq!(l.set_billing_customer(&acct, "cus_second").await.unwrap().as_deref(), Some("cus_first"));
    assert!(l.set_billing_card(&acct, "pm_1").await.unwrap());
    assert!(l.set_billing_card(&acct, "pm_2").await.unwrap());
    assert!(!l.set_billing_card(&unique("nobody"), "pm_1").await.unwrap());
    let b = l.billing(&acct).await.unwrap().unwrap();
    assert_eq!((b.customer.as_deref(), b.card.as_deref(), b.card_failed), (Some("cus_first"), Some("pm_2"), false));
}

/// Buys one auto top-up of 200 on a fresh account (allocation 100, threshold 30, a charge of
/// `cost`); returns the account and the top-up's payment reference.
async fn account_with_an_auto_topup(l: &impl Ledger, cost: u64) -> (String, String) {
    let acct = account(l, 100).await;
    assert!(l.set_billing_card(&acct, "pm_1").await.unwrap());
    let setting = AutoTopup { enabled: true, threshold: 30, package: "200".into(), credits: 200, price_eur: 9.99 };
    assert!(l.set_auto_topup(&acct, &setting).await.unwrap());
    let id = unique("c");
    let r = charged(l.charge(charge(&acct, &id, cost)).await.unwrap());
    assert_eq!(r.auto_topup, Some(200));
    (acct, format!("auto:{id}"))
}

/// A paid auto top-up keeps its credits; whatever is reported later, the first settlement stands.
async fn auto_topup_payment_settled_once(l: &impl Ledger) {
    let (acct, payment_ref) = account_with_an_auto_topup(l, 80).await;
    let paid = Settlement::Paid { payment_id: "pi_1".into() };
    assert_eq!(l.settle_auto_topup(&acct, &payment_ref, 200, AutoTopupPayment::Paid("pi_1")).await.unwrap(), paid);
    assert_eq!(
        l.settle_auto_topup(&acct, &payment_ref, 200, AutoTopupPayment::Failed("declined")).await.unwrap(),
        paid
    );
    assert_eq!(l.settle_auto_topup(&acct, &payment_ref, 200, AutoTopupPayment::Paid("pi_2")).await.unwrap(), paid);
    let v = view(l, &acct).await;
    assert_eq!((v.monthly_remaining, v.topup_remaining, v.auto_topup.unwrap().enabled), (20, 200, true));
    assert!(!l.billing(&acct).await.unwrap().unwrap().card_failed);
    let kinds: Vec<String> = l.pending_events(&acct, 100).await.unwrap().into_iter().map(|e| e.kind).collect();
    assert!(!kinds.iter().any(|k| k == "auto_topup.payment_failed"), "{kinds:?}");
    assert_eq!(
        l.settle_auto_topup(&unique("nobody"), &payment_ref, 200, AutoTopupPayment::Paid("pi_1")).await.unwrap(),
        Settlement::NoAccount
    );
}

/// A declined auto top-up: the credits are taken back as far as unspent (never below 0), auto
/// top-up goes off and stays off, the card is marked failed, the history and an event say so.
async fn failed_auto_topup_payment_takes_back_only_what_is_unspent(l: &impl Ledger) {
    let (acct, payment_ref) = account_with_an_auto_topup(l, 80).await;
    // Spend all 20 monthly credits and 150 of the 200 bought: 50 are left to take back.
    charged(l.charge(charge(&acct, &unique("c"), 170)).await.unwrap());
    let reversed = Settlement::Reversed { taken_back: 50, topup_remaining: 0 };
    let failed = AutoTopupPayment::Failed("Your card was declined.");
    assert_eq!(l.settle_auto_topup(&acct, &payment_ref, 200, failed).await.unwrap(), reversed);
    assert_eq!(l.settle_auto_topup(&acct, &payment_ref, 200, failed).await.unwrap(), reversed, "once");
    assert_eq!(l.settle_auto_topup(&acct, &payment_ref, 200, AutoTopupPayment::Paid("pi_1")).await.unwrap(), reversed);
    let v = view(l, &acct).await;
    assert_eq!((v.monthly_remaining, v.topup_remaining), (0, 0));
    let auto = v.auto_topup.expect("setting kept");
    assert!(!auto.enabled, "switched off");
    assert_eq!((auto.threshold, auto.package.as_str()), (30, "200"));
    let b = l.billing(&acct).await.unwrap().unwrap();
    assert!(b.card_failed);
    let entry = &l.history(&acct, None, 1).await.unwrap().unwrap()[0];
    assert_eq!(
        (entry.kind.as_str(), entry.monthly_delta, entry.topup_delta, entry.topup_after, entry.payment_ref.as_deref()),
        ("auto_topup_reversed", 0, -50, 0, Some(payment_ref.as_str()))
    );
    let events = l.pending_events(&acct, 100).await.unwrap();
    let failed: Vec<&Event> = events.iter().filter(|e| e.kind == "auto_topup.payment_failed").collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(
        failed[0].data,
        json!({"payment_ref": payment_ref, "credits": 200, "taken_back": 50, "topup_remaining": 0,
            "reason": "Your card was declined."})
    );
    // Off means off: a charge that would cross again buys nothing.
    topup(l, &acct, 100).await;
    let r = charged(l.charge(charge(&acct, &unique("c"), 90)).await.unwrap());
    assert_eq!((r.auto_topup, r.remaining()), (None, 10));
    // A new card clears the mark (switching auto top-up on again is the customer's choice).
    assert!(l.set_billing_card(&acct, "pm_2").await.unwrap());
    assert!(!l.billing(&acct).await.unwrap().unwrap().card_failed);
}

/// Usage by category, operation and UTC day, refunds subtracting; earlier periods present as 0.
async fn usage_by_category_operation_and_day(l: &impl Ledger) {
    let acct = account(l, 100).await;
    let day_before = now().div_euclid(86_400);
    let mut refunded = String::new();
    for (operation, category, cost) in [
        ("ai_chat", "AI Chat", 3),
        ("ai_chat", "AI Chat", 5),
        ("lead_enrichment", "Enrichment", 4),
        ("icebreaker", "Campaigns", 2),
    ] {
        let id = unique("c");
        charged(l.charge(ChargeRequest { operation, category, ..charge(&acct, &id, cost) }).await.unwrap());
        if cost == 5 {
            refunded = id;
        }
    }
    assert!(matches!(l.refund(&acct, &refunded).await.unwrap(), RefundOutcome::Refunded { .. }));
    let day_after = now().div_euclid(86_400);
    let usage = l.usage(&acct, 6).await.unwrap().expect("account exists");
    let v = view(l, &acct).await;
    let u = &usage.current;
    assert_eq!((u.period_start, u.period_end, u.total), (v.period_start, v.renews_at, 9));
    let map = |pairs: &[(&str, u64)]| pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect::<BTreeMap<_, _>>();
    assert_eq!(u.by_category, map(&[("AI Chat", 3), ("Enrichment", 4), ("Campaigns", 2)]));
    assert_eq!(u.by_operation, map(&[("ai_chat", 3), ("lead_enrichment", 4), ("icebreaker", 2)]));
    assert!(u.by_day.keys().all(|d| (day_before..=day_after).contains(d)), "{:?}", u.by_day);
    assert_eq!(u.by_day.values().sum::<u64>(), 9);
    assert_eq!(usage.earlier.len(), 6);
    let mut end = u.period_start;
    for p in &usage.earlier {
        assert_eq!(p.period_end, end, "earlier periods newest first, back to back");
        assert!(p.period_start < p.period_end);
        assert_eq!((p.total, p.by_category.len(), p.by_operation.len(), p.by_day.len()), (0, 0, 0, 0));
        end = p.period_start;
    }
    let refund = &l.history(&acct, None, 1).await.unwrap().unwrap()[0];
    assert_eq!((refund.kind.as_str(), refund.monthly_delta, refund.topup_delta), ("refund", 5, 0));
    assert_eq!((refund.operation.as_deref(), refund.category.as_deref()), (Some("ai_chat"), Some("AI Chat")));
    assert_eq!((refund.charge_id.as_deref(), refund.request_id.as_deref()), (Some(refunded.as_str()), None));
    assert_eq!(l.usage(&unique("nobody"), 6).await.unwrap(), None);
}

/// Events in order with their ids and data; acknowledged ones (in or out of order) are gone, and
/// an account with none left is no longer listed.
async fn events_listed_and_acknowledged(l: &impl Ledger) {
    let acct = account(l, 10).await;
    let created = l.history(&acct, None, 10).await.unwrap().unwrap();
    assert_eq!(created.len(), 1);
    let e = &created[0];
    assert_eq!(
        (e.seq, e.kind.as_str(), e.monthly_delta, e.topup_delta, e.monthly_after, e.topup_after),
        (1, "created", 10, 0, 10, 0)
    );
    assert_eq!(e.plan.as_deref(), Some("test"));
    assert!(l.pending_events(&acct, 10).await.unwrap().is_empty(), "creating an account raises no event");

    let payments: Vec<String> = (0..3).map(|_| unique("pay")).collect();
    for (i, payment) in payments.iter().enumerate() {
        let package = if i == 0 { Some("200") } else { None };
        let req = TopupRequest { account: &acct, credits: 10 * (i as u64 + 1), payment_ref: payment, package };
        assert!(matches!(l.topup(req).await.unwrap(), TopupOutcome::Created(_)));
    }
    assert!(l.event_accounts().await.unwrap().contains(&acct));
    let events = l.pending_events(&acct, 2).await.unwrap();
    let ids: Vec<String> = (1..=3).map(|n| format!("evt_{acct}_{n}")).collect();
    assert_eq!(
        events.iter().map(|e| e.id.as_str()).collect::<Vec<_>>(),
        [ids[0].as_str(), ids[1].as_str()],
        "oldest first, at most 2"
    );
    let first = &events[0];
    assert_eq!((first.kind.as_str(), first.account_id.as_str()), ("topup.completed", acct.as_str()));
    assert!(first.created_at.abs_diff(now()) <= 2);
    assert_eq!(first.data, json!({"payment_ref": payments[0], "credits": 10, "package": "200", "topup_remaining": 10}));
    assert_eq!(
        events[1].data,
        json!({"payment_ref": payments[1], "credits": 20, "package": null, "topup_remaining": 30})
    );

    l.ack_events(&acct, &ids[..1]).await.unwrap();
    let left: Vec<String> = l.pending_events(&acct, 10).await.unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(left, ids[1..].to_vec());
    l.ack_events(&acct, &[ids[2].clone(), unique("evt")]).await.unwrap();
    let left: Vec<String> = l.pending_events(&acct, 10).await.unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(left, ids[1..2].to_vec(), "acknowledged out of order");
    assert!(l.event_accounts().await.unwrap().contains(&acct), "still one to deliver");
    l.ack_events(&acct, &ids).await.unwrap();
    assert!(l.pending_events(&acct, 10).await.unwrap().is_empty());
    assert!(!l.event_accounts().await.unwrap().contains(&acct), "nothing left to deliver");
    // A later event gets the next id.
    topup(l, &acct, 1).await;
    let next: Vec<String> = l.pending_events(&acct, 10).await.unwrap().into_iter().map(|e| e.id).collect();
    assert_eq!(next, vec![format!("evt_{acct}_4")]);
    assert!(l.event_accounts().await.unwrap().contains(&acct));
    l.ack_events(&acct, &next).await.unwrap();
    assert!(!l.event_accounts().await.unwrap().contains(&acct));
    assert!(l.pending_events(&unique("nobody"), 10).await.unwrap().is_empty());
    l.ack_events(&unique("nobody"), &next).await.unwrap();
}

/// 50 concurrent charges take the total across the threshold: exactly one buys.
async fn concurrent_crossing_buys_one_auto_topup<L: Ledger>(l: Arc<L>) {
    let acct = account(&*l, 100).await;
    assert!(l.set_auto_topup(&acct, &auto_setting(true, 50, 200)).await.unwrap());
    let outcomes = concurrently(50, |i| {
        let (l, acct) = (l.clone(), acct.clone());
        async move { charged(l.charge(charge(&acct, &format!("c{i}"), 2)).await.unwrap()) }
    })
    .await;
    let bought: Vec<&Receipt> = outcomes.iter().filter(|r| r.auto_topup.is_some()).collect();
    assert_eq!(bought.len(), 1, "one crossing, one purchase");
    assert_eq!(bought[0].remaining(), 48 + 200, "bought by the charge that went from 50 to 48");
    let v = view(&*l, &acct).await;
    assert_eq!((v.remaining(), v.auto_topups_this_period), (200, 1));
    let events = l.pending_events(&acct, 100).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.kind == "auto_topup.purchased").count(), 1);
}

/// 200 concurrent charges run an account dry: `credits.low` at 20 % and 10 %, then
/// `credits.exhausted`, each once, with the remaining at the moment it was reached; not again in
/// the same period.
async fn concurrent_thresholds_fire_once_each<L: Ledger>(l: Arc<L>) {
    let acct = account(&*l, 200).await;
    let outcomes = concurrently(200, |i| {
        let (l, acct) = (l.clone(), acct.clone());
        async move {
            let id = format!("c{i}");
            l.charge(ChargeRequest { thresholds: &[20, 10, 0], ..charge(&acct, &id, 1) }).await.unwrap()
        }
    })
    .await;
    assert!(outcomes.iter().all(|o| matches!(o, ChargeOutcome::Charged(_))));
    let renews_at = rfc3339(view(&*l, &acct).await.renews_at);
    let events = l.pending_events(&acct, 100).await.unwrap();
    let fired: Vec<(&str, serde_json::Value)> = events.iter().map(|e| (e.kind.as_str(), e.data.clone())).collect();
    assert_eq!(
        fired,
        [
            ("credits.low", json!({"threshold": 20, "remaining": 40, "allocation": 200, "renews_at": renews_at})),
            ("credits.low", json!({"threshold": 10, "remaining": 20, "allocation": 200, "renews_at": renews_at})),
            ("credits.exhausted", json!({"threshold": 0, "remaining": 0, "allocation": 200, "renews_at": renews_at})),
        ]
    );
    topup(&*l, &acct, 50).await;
    for cost in [10, 40] {
        let id = unique("c");
        charged(l.charge(ChargeRequest { thresholds: &[20, 10, 0], ..charge(&acct, &id, cost) }).await.unwrap());
    }
    let events = l.pending_events(&acct, 100).await.unwrap();
    assert_eq!(events.len(), 4, "only the top-up's event: once per threshold per period");
}

/// Each charge checks the thresholds its request carries (the running config's; a reload changes
/// them between two charges), each crossed one once, several crossed at once largest first.
async fn thresholds_follow_each_charge(l: &impl Ledger) {
    let acct = account(l, 100).await;
    for (cost, thresholds) in [(50, &[50u8][..]), (25, &[10, 30]), (20, &[10, 30, 10]), (5, &[])] {
        charged(l.charge(ChargeRequest { thresholds, ..charge(&acct, &unique("c"), cost) }).await.unwrap());
    }
    topup(l, &acct, 10).await;
    charged(l.charge(ChargeRequest { thresholds: &[0, 20], ..charge(&acct, &unique("c"), 10) }).await.unwrap());
    let events = l.pending_events(&acct, 100).await.unwrap();
    let fired: Vec<(&str, u64, u64)> = events
        .iter()
        .filter(|e| e.kind.starts_with("credits."))
        .map(|e| (e.kind.as_str(), e.data["threshold"].as_u64().unwrap(), e.data["remaining"].as_u64().unwrap()))
        .collect();
    assert_eq!(
        fired,
        [
            ("credits.low", 50, 50),
            ("credits.low", 30, 25),
            ("credits.low", 10, 5),
            ("credits.low", 20, 0),
            ("credits.exhausted", 0, 0)
        ]
    );
}

// === the job queue ===

/// Jobs queue at the tail up to the cap; a claim takes the oldest due job and leases it, so the
/// next claimer gets the next job; the claimed job is what was queued, byte for byte.
async fn queue_order_cap_and_claims(l: &(impl Ledger + JobStore)) {
    let acct = account(l, 10).await;
    let headers = job_headers();
    let body: Vec<u8> = vec![0xff, 0x00, b'{', 0xc3, 0x28, b'}', b'\r', b'\n'];
    let ids: Vec<String> = (0..3).map(|_| unique("job")).collect();
    for (i, id) in ids.iter().enumerate() {
        let body = if i == 2 { &[][..] } else { &body[..] };
        let queued = l.enqueue_job(new_job(&acct, id, &headers, body, 3)).await.unwrap();
        assert_eq!(queued, EnqueueOutcome::Queued { depth: i as u64 + 1 });
    }
    let full = l.enqueue_job(new_job(&acct, &unique("job"), &headers, &body, 3)).await.unwrap();
    assert_eq!(full, EnqueueOutcome::Full, "the cap counts queued jobs");
    let nobody = unique("nobody");
    let orphan = l.enqueue_job(new_job(&nobody, &unique("job"), &headers, &body, 3)).await.unwrap();
    assert_eq!(orphan, EnqueueOutcome::NoAccount);
    assert_eq!(l.queue_depth(&acct).await.unwrap(), 3);
    assert_eq!(l.queue_depth(&nobody).await.unwrap(), 0);
    assert!(l.job_accounts().await.unwrap().contains(&acct));
    assert!(!l.job_accounts().await.unwrap().contains(&nobody));

    let v = l.job(&acct, &ids[0]).await.unwrap().expect("a queued job is readable");
    assert_eq!(
        (v.id.as_str(), v.status.as_str(), v.operation.as_str(), v.cost, v.attempts),
        (ids[0].as_str(), "queued", "transcription", 2, 0)
    );
    assert_eq!((v.result_status, &v.result_headers, &v.result_body, &v.error), (None, &vec![], &None, &None));
    assert!(v.created_at.abs_diff(now()) <= 2 && v.updated_at == v.created_at, "{v:?}");

    let first = l.claim_job(&acct, "runner-a", 60).await.unwrap().expect("a job is due");
    let want = Job {
        id: ids[0].clone(),
        account: acct.clone(),
        operation: "transcription".into(),
        category: "Transcription".into(),
        cost: 2,
        upstream: "crm".into(),
        method: "POST".into(),
        path: "/v1/calls/transcribe?lang=de".into(),
        headers: headers.clone(),
        body: body.clone(),
        request_id: "req-job".into(),
        attempts: 0,
        created_at: v.created_at,
    };
    assert_eq!(first, want);
    assert_eq!(first.charge_id(), format!("job-{}-0", ids[0]));
    assert_eq!(l.job(&acct, &ids[0]).await.unwrap().unwrap().status, "running");
    let second = l.claim_job(&acct, "runner-b", 60).await.unwrap().expect("the next job");
    assert_eq!(second.id, ids[1], "a leased job is skipped, not waited for");
    let third = l.claim_job(&acct, "runner-a", 60).await.unwrap().expect("the last job");
    assert_eq!((third.id.as_str(), third.body.as_slice()), (ids[2].as_str(), &[][..]), "an empty body");
    assert_eq!(l.claim_job(&acct, "runner-c", 60).await.unwrap(), None, "every job is leased");
    assert_eq!(l.queue_depth(&acct).await.unwrap(), 3, "running jobs count as queued");
    assert_eq!(l.claim_job(&nobody, "runner-a", 60).await.unwrap(), None);
}

/// A crashed runner's lease runs out and another runner takes the job at the same attempt (same
/// charge id); the first can no longer finish it. A retry counts an attempt and waits its delay.
async fn lease_expiry_and_retry_delay(l: &(impl Ledger + JobStore)) {
    let acct = account(l, 10).await;
    let id = unique("job");
    queue(l, &acct, &id).await;
    // Leases and delays are whole seconds: 2 s cannot run out between two immediate claims.
    let a = l.claim_job(&acct, "runner-a", 2).await.unwrap().expect("due");
    assert_eq!(l.claim_job(&acct, "runner-b", 2).await.unwrap(), None, "leased to runner-a");
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let b = l.claim_job(&acct, "runner-b", 60).await.unwrap().expect("runner-a's lease ran out");
    assert_eq!(b, a, "same job, same attempt: the same charge id");
    assert!(!l.finish_job(&acct, &id, "runner-a", done(200, b"late")).await.unwrap(), "runner-a lost the lease");
    assert_eq!(l.job(&acct, &id).await.unwrap().unwrap().status, "running");

    let retry = JobFinish::Retry { reason: "upstream answered 503".into(), delay_secs: 2 };
    assert!(l.finish_job(&acct, &id, "runner-b", retry).await.unwrap());
    let v = l.job(&acct, &id).await.unwrap().unwrap();
    assert_eq!(
        (v.status.as_str(), v.attempts, v.error.as_deref()),
        ("queued", 1, Some("upstream answered 503")),
        "a retry counts an attempt"
    );
    assert_eq!(l.claim_job(&acct, "runner-a", 60).await.unwrap(), None, "not before the delay");
    assert_eq!(l.queue_depth(&acct).await.unwrap(), 1, "still queued");
    assert!(l.job_accounts().await.unwrap().contains(&acct));
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    let again = l.claim_job(&acct, "runner-a", 60).await.unwrap().expect("due after the delay");
    assert_eq!((again.attempts, again.charge_id()), (1, format!("job-{id}-1")), "a new attempt, a new charge id");
}

/// Only the lease holder finishes a job. A release puts it back at once, counting no attempt; a
/// failure counts one and keeps the reason; a finished job leaves the queue and has no lease.
async fn finish_by_the_lease_holder_release_and_failure(l: &(impl Ledger + JobStore)) {
    let acct = account(l, 10).await;
    let (j1, j2) = (unique("job"), unique("job"));
    queue(l, &acct, &j1).await;
    queue(l, &acct, &j2).await;
    assert_eq!(l.claim_job(&acct, "runner-a", 60).await.unwrap().unwrap().id, j1);
    assert!(!l.finish_job(&acct, &j1, "runner-b", JobFinish::Release).await.unwrap(), "not the lease holder");
    assert!(!l.finish_job(&acct, &unique("job"), "runner-a", JobFinish::Release).await.unwrap(), "no such job");
    assert!(!l.finish_job(&unique("nobody"), &j1, "runner-a", JobFinish::Release).await.unwrap(), "no such account");
    assert_eq!(l.job(&acct, &j1).await.unwrap().unwrap().status, "running", "a refused finish changes nothing");

    assert!(l.finish_job(&acct, &j1, "runner-a", JobFinish::Release).await.unwrap());
    let v = l.job(&acct, &j1).await.unwrap().unwrap();
    assert_eq!((v.status.as_str(), v.attempts, v.error), ("queued", 0, None), "a release counts no attempt");
    let again = l.claim_job(&acct, "runner-b", 60).await.unwrap().expect("released jobs are due at once");
    assert_eq!((again.id.as_str(), again.attempts), (j1.as_str(), 0), "still the oldest");

    let failed = JobFinish::Failed { reason: "gave up after 3 attempts".into(), retention_secs: 3600 };
    assert!(l.finish_job(&acct, &j1, "runner-b", failed).await.unwrap());
    let v = l.job(&acct, &j1).await.unwrap().unwrap();
    assert_eq!(
        (v.status.as_str(), v.attempts, v.error.as_deref(), v.result_status, v.result_body),
        ("failed", 1, Some("gave up after 3 attempts"), None, None)
    );
    assert!(!l.finish_job(&acct, &j1, "runner-b", JobFinish::Release).await.unwrap(), "a finished job has no lease");
    assert_eq!(l.queue_depth(&acct).await.unwrap(), 1, "a failed job leaves the queue");
    assert_eq!(l.claim_job(&acct, "runner-a", 60).await.unwrap().unwrap().id, j2);
}

/// A done job keeps its result (status, headers, body with non-UTF-8 bytes) for its account only;
/// the last finished job empties the queue and the account leaves `job_accounts`.
async fn done_keeps_the_result_for_its_account_only(l: &(impl Ledger + JobStore)) {
    let (acct, other) = (account(l, 10).await, account(l, 10).await);
    let id = unique("job");
    queue(l, &acct, &id).await;
    assert!(l.job_accounts().await.unwrap().contains(&acct));
    let created_at = l.claim_job(&acct, "runner-a", 60).await.unwrap().expect("due").created_at;
    let body = vec![0x89, b'P', b'N', b'G', 0x00, 0xff, 0xfe, 0x80];
    let headers = vec![
        ("content-type".to_owned(), "application/octet-stream".to_owned()),
        ("x-request-id".to_owned(), "up-1".to_owned()),
    ];
    let finish = JobFinish::Done { status: 201, headers: headers.clone(), body: body.clone(), retention_secs: 3600 };
    assert!(l.finish_job(&acct, &id, "runner-a", finish).await.unwrap());
    let v = l.job(&acct, &id).await.unwrap().expect("the result is kept");
    assert_eq!(
        v,
        JobView {
            id: id.clone(),
            status: "done".into(),
            operation: "transcription".into(),
            cost: 2,
            attempts: 0,
            created_at,
            updated_at: v.updated_at,
            result_status: Some(201),
            result_headers: headers,
            result_body: Some(body),
            error: None,
        }
    );
    assert!(v.updated_at >= created_at && v.updated_at.abs_diff(now()) <= 2);
    assert_eq!(l.job(&other, &id).await.unwrap(), None, "another account's job");
    assert_eq!(l.job(&acct, &unique("job")).await.unwrap(), None, "an unknown id");
    assert_eq!(l.job(&unique("nobody"), &id).await.unwrap(), None, "an unknown account");
    assert_eq!(l.queue_depth(&acct).await.unwrap(), 0);
    assert!(!l.job_accounts().await.unwrap().contains(&acct), "an emptied queue is no longer listed");
    assert_eq!(l.claim_job(&acct, "runner-a", 60).await.unwrap(), None);
    assert!(!l.finish_job(&acct, &id, "runner-a", done(200, b"again")).await.unwrap(), "finished once");
}

/// 20 runners claim at once from a queue of 5: each job is claimed exactly once.
async fn concurrent_claimers_take_each_job_once<L: Ledger + JobStore>(l: Arc<L>) {
    let acct = account(&*l, 10).await;
    let ids: Vec<String> = (0..5).map(|_| unique("job")).collect();
    for id in &ids {
        queue(&*l, &acct, id).await;
    }
    let claims = concurrently(20, |i| {
        let (l, acct) = (l.clone(), acct.clone());
        async move { l.claim_job(&acct, &format!("runner-{i}"), 60).await.unwrap() }
    })
    .await;
    let mut claimed: Vec<String> = claims.into_iter().flatten().map(|j| j.id).collect();
    claimed.sort();
    let mut want = ids.clone();
    want.sort();
    assert_eq!(claimed, want, "each job claimed exactly once");
}

/// A job step is the first step after a period boundary: it renews the account (entry, event,
/// and, on Redis, the outbox index), like every other step.
async fn renewal_through_a_job_step(l: &(impl Ledger + JobStore)) {
    let anchor = now() + 3; // whole seconds: 2 to 3 s from now
    let acct = unique("acct");
    let new = NewAccount { id: acct.clone(), plan: "free".into(), allocation: 50, anchor, email: None };
    assert!(l.create_account(new).await.unwrap());
    let id = unique("job");
    queue(l, &acct, &id).await;
    assert!(!l.event_accounts().await.unwrap().contains(&acct), "no event yet");
    assert!(now() < anchor, "the setup took too long to test a renewal");

    sleep_until(anchor).await;
    assert_eq!(l.claim_job(&acct, "runner-a", 60).await.unwrap().map(|j| j.id), Some(id));
    assert!(l.event_accounts().await.unwrap().contains(&acct), "the renewal's event is indexed");
    let events = l.pending_events(&acct, 10).await.unwrap();
    assert_eq!(events.iter().map(|e| e.kind.as_str()).collect::<Vec<_>>(), ["credits.renewed"]);
    let history = l.history(&acct, None, 10).await.unwrap().unwrap();
    assert_eq!(history.iter().filter(|e| e.kind == "renewal").count(), 1, "renewed once");
    assert_eq!(view(l, &acct).await.period_start, anchor);
}

// === Redis only ===

/// The scripts use max(Redis TIME, the highest "now" the account has seen).
async fn clock_never_goes_back(l: &RedisLedger, redis: impl Fn(&[&str]) -> String) {
    let acct = account(l, 10).await;
    let later = now() + 1000;
    redis(&["EVAL", state::SET, "1", &keys::account(&acct), state::NOW, &later.to_string()]);
    let req = TopupRequest { account: &acct, credits: 1, payment_ref: &unique("pay"), package: None };
    let TopupOutcome::Created(r) = l.topup(req).await.unwrap() else { panic!("top-up not created") };
    assert_eq!(r.created_at, later);
}

/// Charge records live in time buckets one record TTL long (lua/lib.lua): a record written in the
/// previous bucket still makes a re-sent step answer its receipt and a refund find it, so neither
/// a second debit nor a lost refund can happen at a bucket boundary.
async fn records_are_found_across_a_bucket_boundary(l: &RedisLedger) {
    l.set_limits(StoreLimits { charge_record_secs: 2, ..StoreLimits::default() });
    let acct = account(l, 10).await;
    let (resent, refunded) = (unique("c"), unique("c"));
    let first = charged(l.charge(charge(&acct, &resent, 3)).await.unwrap());
    charged(l.charge(charge(&acct, &refunded, 2)).await.unwrap());
    let bucket = now() / 2;
    while now() / 2 == bucket {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = charged(l.charge(charge(&acct, &resent, 3)).await.unwrap());
    assert_eq!((again.cost, again.from_monthly, again.from_topup), (first.cost, first.from_monthly, first.from_topup));
    assert!(matches!(l.refund(&acct, &refunded).await.unwrap(), RefundOutcome::Refunded { to_monthly: 2, .. }));
    assert_eq!(view(l, &acct).await.monthly_remaining, 7, "one debit of 3, the 2 refunded");
}

/// A charge recorded by a version before the record buckets (its own hash at
/// `cg:{acct:<id>}:charge:<id>`, counted in the old usage fields) is still refunded, once, to its
/// buckets, and its usage comes back off the old counters.
async fn a_record_of_the_previous_layout_is_refunded(l: &RedisLedger, redis: impl Fn(&[&str]) -> String) {
    let acct = account(l, 10).await;
    let account_key = keys::account(&acct);
    let period = redis(&["EVAL", state::GET, "1", &account_key, state::PERIOD]).trim().to_owned();
    let day = (now() / 86_400).to_string();
    // What the old charge.lua left after a charge of 3 from the monthly bucket.
    redis(&["EVAL", state::SET, "1", &account_key, state::MONTHLY, "7", state::USED, "3"]);
    redis(&[
        "HSET",
        &keys::charge(&acct, "old"),
        "cost",
        "3",
        "from_monthly",
        "3",
        "from_topup",
        "0",
        "period",
        &period,
        "refunded",
        "0",
        "operation",
        "ai_chat",
        "category",
        "ai",
        "day",
        &day,
    ]);
    let usage = format!("{account_key}:usage:{period}");
    redis(&["HSET", &usage, "t", "3", "c:ai", "3", "o:ai_chat", "3", &format!("d:{day}"), "3"]);
    assert!(matches!(
        l.refund(&acct, "old").await.unwrap(),
        RefundOutcome::Refunded { to_monthly: 3, to_topup: 0, .. }
    ));
    assert_eq!(l.refund(&acct, "old").await.unwrap(), RefundOutcome::AlreadyRefunded);
    assert_eq!(view(l, &acct).await.monthly_remaining, 10);
    assert_eq!(redis(&["HGET", &usage, "c:ai"]).trim(), "0", "the old counters give the credits back");
}

/// An account written before the `state` field (its values in fields of their own) and a charge
/// record in the decimal-text form: both are read, charged and refunded as before, and the
/// account's next write moves it into `state`, dropping the old fields.
async fn the_layout_before_state_is_read_and_moved(l: &RedisLedger, redis: impl Fn(&[&str]) -> String) {
    let acct = account(l, 10).await;
    let key = keys::account(&acct);
    let value = |place: &str| redis(&["EVAL", state::GET, "1", &key, place]).trim().to_owned();
    let (now_seen, period) = (value(state::NOW), value(state::PERIOD));
    let period_end = value("7");
    redis(&["HDEL", &key, "state"]);
    redis(&[
        "HSET",
        &key,
        "allocation",
        "10",
        "period",
        &period,
        "monthly",
        "7",
        "topup",
        "0",
        "used",
        "3",
        "now",
        &now_seen,
        "hist",
        "1",
        "evt",
        "0",
        "auto_count",
        "0",
        "period_end",
        &period_end,
    ]);
    assert_eq!(view(l, &acct).await.monthly_remaining, 7, "read from the old fields");
    // The record of that charge of 3 as the text form wrote it, in the current bucket.
    let bucket = now() / StoreLimits::default().charge_record_secs;
    let day = now() / 86_400;
    redis(&["HSET", &format!("{key}:charges:{bucket}"), "old", &format!("3 3 0 {period} {day} 0 0 2:ai7:ai_chat")]);
    let r = charged(l.charge(charge(&acct, &unique("c"), 2)).await.unwrap());
    assert_eq!((r.from_monthly, r.monthly_remaining), (2, 5));
    assert_eq!(redis(&["HEXISTS", &key, "monthly"]).trim(), "0", "the old fields went with the first write");
    // The bucket, made by hand without an expiry, got one from the account's first charge in it.
    let ttl: i64 = redis(&["TTL", &format!("{key}:charges:{bucket}")]).trim().parse().unwrap();
    assert!(ttl > 0, "the record bucket expires: TTL {ttl}");
    assert_eq!((value(state::MONTHLY), value(state::USED)), ("5".to_owned(), "5".to_owned()));
    assert!(matches!(l.refund(&acct, "old").await.unwrap(), RefundOutcome::Refunded { to_monthly: 3, .. }));
    assert_eq!(l.refund(&acct, "old").await.unwrap(), RefundOutcome::AlreadyRefunded);
    assert_eq!(view(l, &acct).await.monthly_remaining, 8, "the text record's 3 came back");
    let kinds: Vec<String> = l.history(&acct, None, 10).await.unwrap().unwrap().into_iter().map(|e| e.kind).collect();
    assert_eq!(kinds, ["refund", "charge", "created"]);
}

/// A charge's history entry in the form written before the "n" form ("c", then seq, at and the
/// four amounts as MessagePack, then the request's part) reads as the same entry.
async fn a_charge_entry_written_before_reads_the_same(l: &RedisLedger, redis: impl Fn(&[&str]) -> String) {
    let acct = account(l, 10).await;
    charged(l.charge(charge(&acct, &unique("c"), 3)).await.unwrap());
    let before = format!("{:?}", l.history(&acct, None, 10).await.unwrap().unwrap());
    let rewrite = "local e = redis.call('LINDEX', KEYS[1], -1)
        local at, fm, ft, _, _, seq, now, m, t = cmsgpack.unpack_limit(e, 8, 1)
        redis.call('LSET', KEYS[1], -1, 'c' .. cmsgpack.pack(seq, now, -fm, -ft, m, t) .. string.sub(e, at + 1))
        return string.sub(e, 1, 1)";
    let history = format!("{}:history", keys::account(&acct));
    assert_eq!(redis(&["EVAL", rewrite, "1", &history]).trim(), "n", "the charge's entry was in the \"n\" form");
    assert_eq!(redis(&["LINDEX", &history, "-1"]).as_bytes().first(), Some(&b'c'));
    assert_eq!(format!("{:?}", l.history(&acct, None, 10).await.unwrap().unwrap()), before);
}

/// The export index counts what is left to export from the account's state (`hist` beyond
/// `exp`): a sweep indexes an account with entries left and leaves out one exported to the end.
async fn export_sweep_counts_what_is_left(l: &RedisLedger, redis: impl Fn(&[&str]) -> String) {
    l.set_limits(StoreLimits { history_exported_only: true, ..Default::default() });
    let acct = account(l, 10).await;
    // Cost 5: the state's used credits (5) are not its history entries (2).
    charged(l.charge(charge(&acct, &unique("c"), 5)).await.unwrap());
    let index = keys::export_index(&acct);
    let indexed = || redis(&["SISMEMBER", &index, &acct]).trim() == "1";
    // This instance's own marks (every step makes one) go into the index first.
    l.export_accounts().await.unwrap();
    redis(&["SREM", &index, &acct]);
    l.sweep_exports().await.unwrap();
    assert!(indexed(), "entries left: indexed by the sweep");
    let entries = l.unexported(&acct, 100).await.unwrap();
    assert_eq!(entries.len(), 2, "created and the charge");
    assert_eq!(l.ack_export(&acct, entries[1].seq).await.unwrap(), 0);
    l.export_accounts().await.unwrap();
    redis(&["SREM", &index, &acct]);
    l.sweep_exports().await.unwrap();
    assert!(!indexed(), "all exported: not indexed again");
}

/// The outbox index lost an account (the process died between a step and its SADD): a sweep
/// finds the outbox again. A stale entry (no events left) goes away at the next look.
async fn outbox_index_recovers(l: &RedisLedger, redis: impl Fn(&[&str]) -> String) {
    let acct = account(l, 10).await;
    topup(l, &acct, 5).await;
    assert!(l.event_accounts().await.unwrap().contains(&acct));
    redis(&["SREM", &keys::outbox_index(&acct), &acct]);
    assert!(!l.event_accounts().await.unwrap().contains(&acct), "index entry lost");
    assert!(l.sweep_outboxes().await.unwrap() >= 1);
    assert!(l.event_accounts().await.unwrap().contains(&acct), "found again by the sweep");
    let events = l.pending_events(&acct, 10).await.unwrap();
    assert_eq!(events.len(), 1);

    let quiet = account(l, 10).await;
    redis(&["SADD", &keys::outbox_index(&quiet), &quiet]);
    assert!(l.event_accounts().await.unwrap().contains(&quiet));
    assert!(l.pending_events(&quiet, 10).await.unwrap().is_empty());
    assert!(!l.event_accounts().await.unwrap().contains(&quiet), "a stale entry is dropped");
    l.ack_events(&acct, &[events[0].id.clone()]).await.unwrap();
    assert!(!l.event_accounts().await.unwrap().contains(&acct));
}

/// The job index lost an account (the process died between queuing and its SADD): a sweep finds
/// the queue again; a stale entry goes at the next claim. A finished job keeps no request body
/// and expires after its retention; the emptied queue is gone.
async fn job_index_recovers_and_finished_jobs_expire(l: &RedisLedger, redis: impl Fn(&[&str]) -> String) {
    let acct = account(l, 10).await;
    let id = unique("job");
    queue(l, &acct, &id).await;
    assert!(l.job_accounts().await.unwrap().contains(&acct));
    redis(&["SREM", &keys::job_index(&acct), &acct]);
    assert!(!l.job_accounts().await.unwrap().contains(&acct), "index entry lost");
    assert!(l.sweep_job_queues().await.unwrap() >= 1);
    assert!(l.job_accounts().await.unwrap().contains(&acct), "found again by the sweep");

    let quiet = account(l, 10).await;
    redis(&["SADD", &keys::job_index(&quiet), &quiet]);
    assert!(l.job_accounts().await.unwrap().contains(&quiet));
    assert_eq!(l.claim_job(&quiet, "runner-a", 60).await.unwrap(), None);
    assert!(!l.job_accounts().await.unwrap().contains(&quiet), "a stale entry is dropped");

    let record = keys::job(&acct, &id);
    assert_eq!(redis(&["HEXISTS", &record, "body"]), "1");
    assert_eq!(redis(&["TTL", &record]), "-1", "a queued job does not expire");
    assert_eq!(l.claim_job(&acct, "runner-a", 60).await.unwrap().map(|j| j.id), Some(id.clone()));
    let finish = JobFinish::Done { status: 200, headers: vec![], body: b"ok".to_vec(), retention_secs: 600 };
    assert!(l.finish_job(&acct, &id, "runner-a", finish).await.unwrap());
    assert_eq!(redis(&["HEXISTS", &record, "body"]), "0", "the request body is dropped");
    let ttl: i64 = redis(&["TTL", &record]).parse().unwrap();
    assert!((590..=600).contains(&ttl), "expires after the retention: {ttl}");
    assert_eq!(redis(&["EXISTS", &keys::job_queue(&acct)]), "0");
    assert!(!l.job_accounts().await.unwrap().contains(&acct));
    assert_eq!(l.job(&acct, &id).await.unwrap().unwrap().result_body, Some(b"ok".to_vec()));
}

/// One sequence of steps on a memory store and on this store, with the same account id and a
/// renewal (pending downgrade, auto top-up, thresholds, refunds across the boundary) in the
/// middle: every outcome, view, history entry, event and usage figure agrees, timestamps aside.
async fn same_steps_as_memory(redis: &RedisLedger) {
    let acct = unique("same");
    let anchor = now() + 3; // whole seconds: 2 to 3 s from now
    let memory = MemoryLedger::new();
    let (on_memory, on_redis) = tokio::join!(transcript(&memory, &acct, anchor), transcript(redis, &acct, anchor));
    assert_eq!(on_memory.len(), on_redis.len());
    for (m, r) in on_memory.iter().zip(&on_redis) {
        assert_eq!(m, r, "memory and Redis differ");
    }
}

/// What `same_steps_as_memory` compares: every answer, with times set to 0.
async fn transcript(l: &(impl Ledger + JobStore), acct: &str, anchor: i64) -> Vec<String> {
    let mut out = Vec::new();
    let new = NewAccount { id: acct.into(), plan: "pro".into(), allocation: 200, anchor, email: Some("a@b.c".into()) };
    out.push(format!("{:?}", l.create_account(new).await.unwrap()));
    let setting = AutoTopup { enabled: true, threshold: 60, package: "p50".into(), credits: 50, price_eur: 10.0 };
    out.push(format!("{:?}", l.set_auto_topup(acct, &setting).await.unwrap()));
    fn step<'a>(acct: &'a str, id: &'a str, cost: u64, operation: &'a str) -> ChargeRequest<'a> {
        ChargeRequest {
            operation,
            category: if operation == "ai_chat" { "AI Chat" } else { "Insights" },
            thresholds: &[20, 10, 0],
            auto_topup_max_per_period: 2,
            ..charge(acct, id, cost)
        }
    }
    for (i, (cost, operation)) in
        [(50, "ai_chat"), (100, "insights_position"), (30, "ai_chat"), (45, "ai_chat"), (500, "ai_chat")]
            .into_iter()
            .enumerate()
    {
        out.push(format!("{:?}", l.charge(step(acct, &format!("c{i}"), cost, operation)).await.unwrap()));
    }
    out.push(format!("{:?}", l.refund(acct, "c1").await.unwrap()));
    let req = TopupRequest { account: acct, credits: 40, payment_ref: "p1", package: None };
    out.push(format!("{:?}", zero_topup_time(l.topup(req).await.unwrap())));
    out.push(format!(
        "{:?}",
        l.update_account(acct, Some(PlanChange { plan: "starter", allocation: 100 }), None).await.unwrap()
    ));
    out.push(format!("{:?}", l.charge(step(acct, "c5", 70, "ai_chat")).await.unwrap()));
    out.push(format!("{:?}", l.account(acct).await.unwrap()));
    assert!(now() < anchor, "the setup took too long to test a renewal");
    sleep_until(anchor).await;
    out.push(format!("{:?}", l.refund(acct, "c2").await.unwrap()));
    out.push(format!("{:?}", l.refund(acct, "c5").await.unwrap()));
    out.push(format!(
        "{:?}",
        l.update_account(acct, Some(PlanChange { plan: "pro", allocation: 200 }), Some("x@y.z")).await.unwrap()
    ));
    for i in 6..10 {
        out.push(format!("{:?}", l.charge(step(acct, &format!("c{i}"), 60, "insights_position")).await.unwrap()));
    }
    // An auto top-up in the new period (the count restarted), then down to 0 without one.
    out.push(format!("{:?}", l.charge(step(acct, "c10", 20, "ai_chat")).await.unwrap()));
    out.push(format!("{:?}", l.set_auto_topup(acct, &AutoTopup { enabled: false, ..setting }).await.unwrap()));
    for (i, cost) in [(11, 65), (12, 20), (13, 20), (14, 1)] {
        out.push(format!("{:?}", l.charge(step(acct, &format!("c{i}"), cost, "ai_chat")).await.unwrap()));
    }
    out.push(format!("{:?}", l.account(acct).await.unwrap()));
    for e in l.history(acct, None, 1000).await.unwrap().unwrap() {
        out.push(format!("{:?}", HistoryEntry { at: 0, ..e }));
    }
    let events = l.pending_events(acct, 1000).await.unwrap();
    for e in &events {
        out.push(format!("{:?}", Event { created_at: 0, ..e.clone() }));
    }
    let ids: Vec<String> = events.iter().map(|e| e.id.clone()).step_by(2).collect();
    l.ack_events(acct, &ids).await.unwrap();
    out.push(format!(
        "{:?}",
        l.pending_events(acct, 1000).await.unwrap().into_iter().map(|e| e.id).collect::<Vec<_>>()
    ));
    out.push(format!("{:?}", l.usage(acct, 3).await.unwrap()));
    job_transcript(l, acct, &mut out).await;
    out
}

/// The job queue part of `transcript`: queue, claims, every kind of finish, the views.
async fn job_transcript(l: &(impl Ledger + JobStore), acct: &str, out: &mut Vec<String>) {
    let headers = job_headers();
    for (i, body) in [&b"\xff\x00wav"[..], b"", b"x"].into_iter().enumerate() {
        out.push(format!("{:?}", l.enqueue_job(new_job(acct, &format!("j{i}"), &headers, body, 3)).await.unwrap()));
    }
    out.push(format!("{:?}", l.enqueue_job(new_job(acct, "j3", &headers, b"", 3)).await.unwrap()));
    let claim = async |runner: &str| {
        format!("{:?}", l.claim_job(acct, runner, 60).await.unwrap().map(|j| Job { created_at: 0, ..j }))
    };
    let read = async |id: &str| {
        let v = l.job(acct, id).await.unwrap();
        format!("{:?}", v.map(|v| JobView { created_at: 0, updated_at: 0, ..v }))
    };
    let finish = async |id: &str, runner: &str, finish: JobFinish| {
        format!("{:?}", l.finish_job(acct, id, runner, finish).await.unwrap())
    };
    out.push(claim("r1").await);
    out.push(claim("r2").await);
    out.push(finish("j0", "r2", JobFinish::Release).await);
    let retry = JobFinish::Retry { reason: "upstream answered 502".into(), delay_secs: 0 };
    out.push(finish("j0", "r1", retry).await);
    out.push(read("j0").await);
    out.push(claim("r3").await);
    out.push(finish("j1", "r2", JobFinish::Release).await);
    out.push(read("j1").await);
    out.push(finish("j0", "r3", done(200, b"\x00\xfe{}")).await);
    out.push(read("j0").await);
    out.push(claim("r1").await);
    let failed = JobFinish::Failed { reason: "gave up".into(), retention_secs: 3600 };
    out.push(finish("j1", "r1", failed).await);
    out.push(read("j1").await);
    out.push(format!("{:?}", l.queue_depth(acct).await.unwrap()));
    out.push(claim("r2").await);
    out.push(finish("j2", "r2", done(404, b"")).await);
    out.push(read("j2").await);
    out.push(format!("{:?}", l.queue_depth(acct).await.unwrap()));
    out.push(claim("r2").await);
    out.push(read("j9").await);
    out.push(finish("j9", "r2", JobFinish::Release).await);
}

fn zero_topup_time(outcome: TopupOutcome) -> TopupOutcome {
    match outcome {
        TopupOutcome::Created(r) => TopupOutcome::Created(creditgate::ledger::TopupReceipt { created_at: 0, ..r }),
        other => other,
    }
}

/// A call that finds its function missing after a flush (restart, failover) loads the library
/// and retries, invisibly.
async fn survives_a_function_library_flush(l: &RedisLedger, flush: impl Fn()) {
    let acct = account(l, 10).await;
    flush();
    charged(l.charge(charge(&acct, &unique("c"), 1)).await.unwrap());
    flush();
    l.ping().await.expect("readiness reloads the script too");
    assert_eq!(view(l, &acct).await.monthly_remaining, 9);
}

/// Redis crashes and comes back (with `appendfsync always`): the acknowledged charge is still
/// there, and the same ledger recovers without being rebuilt (reconnect, script cache reloaded).
#[tokio::test]
async fn redis_restart_keeps_acknowledged_charges() {
    let mut server = RedisServer::start_with(&["--appendonly", "yes", "--appendfsync", "always"]);
    let l = RedisLedger::connect_standalone(&server.url()).await.expect("connect");
    let acct = account(&l, 10).await;
    charged(l.charge(charge(&acct, &unique("c"), 3)).await.unwrap());
    server.restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let v = loop {
        match l.account(&acct).await {
            Ok(v) => break v.expect("the account survived"),
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "no recovery: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!((v.monthly_remaining, v.used_this_period), (7, 3));
    charged(l.charge(charge(&acct, &unique("c"), 1)).await.unwrap());
}

/// The Lua port of the calendar, run on a real Redis, agrees with `creditgate::calendar`.
#[tokio::test]
async fn lua_calendar_matches_rust() {
    const PROBE: &str = r"
        -- ARGV[1] anchor, ARGV[2] count of k values, then the k values, then instants.
        -- Reply: { period_start of each k, period_at of each instant }
        local a = anchor_from_unix(tonumber(ARGV[1]))
        local nk = tonumber(ARGV[2])
        local starts, ats = {}, {}
        for i = 3, 2 + nk do starts[#starts + 1] = period_start(a, tonumber(ARGV[i])) end
        for i = 3 + nk, #ARGV do ats[#ats + 1] = period_at(a, tonumber(ARGV[i])) end
        return { starts, ats }
    ";
    let server = RedisServer::start();
    let mut conn = redis::Client::open(server.url()).unwrap().get_multiplexed_async_connection().await.unwrap();
    let probe = redis::Script::new(&format!("{}\n{PROBE}", lua_prelude(&Default::default())));
    let lua = async |conn: &mut redis::aio::MultiplexedConnection, anchor: i64, ks: &[i64], instants: &[i64]| {
        let mut inv = probe.arg(anchor);
        inv.arg(ks.len()).arg(ks).arg(instants);
        inv.invoke_async::<(Vec<i64>, Vec<i64>)>(conn).await.unwrap()
    };

    // The month ends of SPEC §1, spelled out.
    let jan31 = ts("2026-01-31T10:00:00Z");
    let (starts, _) = lua(&mut conn, jan31, &[0, 1, 2, 3], &[]).await;
    let starts: Vec<String> = starts.into_iter().map(rfc3339).collect();
    assert_eq!(
        starts,
        ["2026-01-31T10:00:00Z", "2026-02-28T10:00:00Z", "2026-03-31T10:00:00Z", "2026-04-30T10:00:00Z"]
    );
    let (starts, _) = lua(&mut conn, ts("2027-12-31T00:00:00Z"), &[2], &[]).await;
    assert_eq!(rfc3339(starts[0]), "2028-02-29T00:00:00Z", "leap year");
    let (starts, _) = lua(&mut conn, ts("2099-12-30T00:00:00Z"), &[2], &[]).await;
    assert_eq!(rfc3339(starts[0]), "2100-02-28T00:00:00Z", "2100 is not leap");

    // And everything else, against the Rust calendar.
    let anchors = [
        "2024-01-31T12:00:00Z",
        "2024-02-29T00:00:00Z",
        "2025-02-28T00:00:00Z",
        "2026-03-15T08:30:00Z",
        "2026-11-30T23:59:59Z",
        "2026-12-31T23:59:59Z",
        "2099-12-31T06:00:00Z",
        "2399-12-29T00:00:00Z",
        "1969-12-31T23:59:59Z",
        "1900-01-31T00:00:00Z",
    ];
    let ks: Vec<i64> = (-40..=40).collect();
    for text in anchors {
        let a = Anchor::from_unix(ts(text));
        let mut instants = Vec::new();
        for &k in &ks {
            let s = a.period_start(k);
            instants.extend([s - 1, s, s + 1, s + 86_399, s + 14 * 86_400 + 3_601]);
        }
        let (starts, ats) = lua(&mut conn, a.unix(), &ks, &instants).await;
        let want_starts: Vec<i64> = ks.iter().map(|&k| a.period_start(k)).collect();
        let want_ats: Vec<i64> = instants.iter().map(|&t| a.period_at(t)).collect();
        assert_eq!(starts, want_starts, "period_start for anchor {text}");
        assert_eq!(ats, want_ats, "period_at for anchor {text}");
    }
}

// === helpers ===

/// A name no other check uses.
fn unique(prefix: &str) -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("{prefix}-{}-{}", std::process::id(), NEXT.fetch_add(1, Ordering::Relaxed))
}

fn now() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs() as i64
}

fn ts(text: &str) -> i64 {
    parse_rfc3339(text).unwrap()
}

/// Sleeps until the wall clock (Redis runs on this machine: same clock) has reached `unix`.
async fn sleep_until(unix: i64) {
    let target = UNIX_EPOCH + Duration::from_secs(unix as u64) + Duration::from_millis(50);
    if let Ok(wait) = target.duration_since(SystemTime::now()) {
        tokio::time::sleep(wait).await;
    }
}

/// A new account on plan "test" with `allocation` credits, anchored days ago (no renewal soon).
async fn account(l: &impl Ledger, allocation: u64) -> String {
    let id = unique("acct");
    let new = NewAccount {
        id: id.clone(),
        plan: "test".into(),
        allocation,
        anchor: now() - 3 * 86_400,
        email: Some("ops@example.com".into()),
    };
    assert!(l.create_account(new).await.unwrap());
    id
}

async fn view(l: &impl Ledger, id: &str) -> creditgate::ledger::AccountView {
    l.account(id).await.unwrap().expect("account exists")
}

async fn topup(l: &impl Ledger, acct: &str, credits: u64) {
    let req = TopupRequest { account: acct, credits, payment_ref: &unique("pay"), package: None };
    assert!(matches!(l.topup(req).await.unwrap(), TopupOutcome::Created(_)));
}

fn charge<'a>(account: &'a str, charge_id: &'a str, cost: u64) -> ChargeRequest<'a> {
    ChargeRequest {
        account,
        charge_id,
        cost,
        operation: "ai_chat",
        category: "AI Chat",
        request_id: "req",
        idempotency: None,
        thresholds: &[],
        auto_topup_max_per_period: 5,
        packages: &PACKAGES,
    }
}

/// The top-up packages the test charges run with (see [`auto_setting`]).
static PACKAGES: std::sync::LazyLock<Packages> = std::sync::LazyLock::new(|| {
    Packages::new(vec![("200".into(), 200, 9.99), ("p50".into(), 50, 10.0), ("p200".into(), 200, 10.0)])
});

#[track_caller]
fn charged(outcome: ChargeOutcome) -> Receipt {
    match outcome {
        ChargeOutcome::Charged(r) => r,
        other => panic!("expected Charged, got {other:?}"),
    }
}

/// Runs `n` tasks at once on the multi-threaded runtime and collects their results.
async fn concurrently<T, F>(n: usize, task: impl Fn(usize) -> F) -> Vec<T>
where
    T: Send + 'static,
    F: Future<Output = T> + Send + 'static,
{
    let handles: Vec<_> = (0..n).map(|i| tokio::spawn(task(i))).collect();
    futures_util::future::join_all(handles).await.into_iter().map(|r| r.expect("task panicked")).collect()
}

/// The request headers of the test jobs.
fn job_headers() -> Vec<(String, String)> {
    vec![("content-type".to_owned(), "application/json".to_owned()), ("x-ai-tier".to_owned(), "fast".to_owned())]
}

/// A transcription job of 2 credits.
fn new_job<'a>(
    account: &'a str,
    id: &'a str,
    headers: &'a [(String, String)],
    body: &'a [u8],
    max_queued: u64,
) -> NewJob<'a> {
    NewJob {
        id,
        account,
        operation: "transcription",
        category: "Transcription",
        cost: 2,
        upstream: "crm",
        method: "POST",
        path: "/v1/calls/transcribe?lang=de",
        headers,
        body,
        request_id: "req-job",
        max_queued,
        max_queued_bytes: 1 << 20,
        idempotency: None,
    }
}

/// A job whose queueing the gateway could not confirm is withdrawn: out of the queue (never
/// claimed, never paid) if queued; barred if its enqueue has not arrived (a late one queues
/// nothing); left alone once running.
async fn a_job_of_unknown_fate_is_withdrawn_or_barred(l: &(impl Ledger + JobStore)) {
    let acct = account(l, 0).await;
    queue(l, &acct, "job-w1").await;
    queue(l, &acct, "job-w2").await;
    assert!(l.withdraw_job(&acct, "job-w1").await.unwrap());
    assert!(l.withdraw_job(&acct, "job-w1").await.unwrap(), "again: still withdrawn");
    assert_eq!(l.queue_depth(&acct).await.unwrap(), 1);
    let view = l.job(&acct, "job-w1").await.unwrap().expect("kept for its client to read");
    assert_eq!(view.status, "withdrawn");
    assert!(view.error.is_some_and(|e| e.contains("503")));
    let claimed = l.claim_job(&acct, "r1", 60).await.unwrap().expect("the other job");
    assert_eq!(claimed.id, "job-w2");
    assert!(!l.withdraw_job(&acct, "job-w2").await.unwrap(), "running: too late");
    assert_eq!(l.claim_job(&acct, "r2", 60).await.unwrap(), None, "the withdrawn job is never claimed");
    // Withdrawn before its enqueue arrived: the late enqueue is a re-sent step, queueing nothing.
    assert!(l.withdraw_job(&acct, "job-w3").await.unwrap());
    let headers = job_headers();
    let late = l.enqueue_job(new_job(&acct, "job-w3", &headers, b"{}", 100)).await.unwrap();
    assert!(matches!(late, EnqueueOutcome::Queued { .. }), "{late:?}");
    assert_eq!(l.queue_depth(&acct).await.unwrap(), 1, "only job-w2, running");
    assert_eq!(l.job(&acct, "job-w3").await.unwrap().unwrap().status, "withdrawn");

    // A withdrawn job's Idempotency-Key forgets its 202 (nobody was told of the job): the
    // client's retry queues afresh instead of replaying a job that never runs.
    let key = unique("idem-w");
    let idem = Idempotency { key: &key, fingerprint: "f", lease_secs: 600 };
    let (first_id, retry_id) = (unique("job"), unique("job"));
    let first = NewJob { idempotency: Some(idem), ..new_job(&acct, &first_id, &headers, b"{}", 100) };
    assert!(matches!(l.enqueue_job(first).await.unwrap(), EnqueueOutcome::Queued { .. }));
    assert!(l.withdraw_job(&acct, &first_id).await.unwrap());
    let retry = NewJob { idempotency: Some(idem), ..new_job(&acct, &retry_id, &headers, b"{}", 100) };
    let outcome = l.enqueue_job(retry.clone()).await.unwrap();
    assert!(matches!(outcome, EnqueueOutcome::Queued { .. }), "the retry queues afresh: {outcome:?}");
    assert_eq!(l.job(&acct, &retry_id).await.unwrap().unwrap().status, "queued");
    let again = l.enqueue_job(NewJob { id: &unique("job"), ..retry }).await.unwrap();
    let expected = creditgate::ledger::jobs::queued_response(&retry_id, 2);
    assert!(
        matches!(&again, EnqueueOutcome::Idempotent(IdemHit::Replay { response, .. }) if *response == expected),
        "and the key now replays the new job's 202: {again:?}"
    );
}

/// Queues a job (cap 100) and checks it was queued.
async fn queue(l: &impl JobStore, acct: &str, id: &str) {
    let headers = job_headers();
    let outcome = l.enqueue_job(new_job(acct, id, &headers, b"{}", 100)).await.unwrap();
    assert!(matches!(outcome, EnqueueOutcome::Queued { .. }), "{outcome:?}");
}

/// A done finish with a plain text result, kept an hour.
fn done(status: u16, body: &[u8]) -> JobFinish {
    let headers = vec![("content-type".to_owned(), "text/plain".to_owned())];
    JobFinish::Done { status, headers, body: body.to_vec(), retention_secs: 3600 }
}

/// An auto top-up setting buying package "p<credits>" (of [`PACKAGES`]) below `threshold`.
fn auto_setting(enabled: bool, threshold: u64, credits: u64) -> AutoTopup {
    AutoTopup { enabled, threshold, package: format!("p{credits}"), credits, price_eur: 10.0 }
}

/// A small seeded generator (SplitMix64), so the random mix is the same on every run and store.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        (z ^ (z >> 31)) % n
    }
}
