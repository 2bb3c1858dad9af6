-- charge.lua: debits a cost all-or-nothing, monthly bucket first, then top-ups; records usage
-- and history, buys the auto top-up on a threshold crossing, raises low-credit events.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- KEYS[2]  idempotency record      cg:{acct:<id>}:idem:<key>   (present iff the charge has an
--          idempotency key)
-- ARGV[1]  charge id
-- ARGV[2]  cost
-- ARGV[3]  category and operation as the charge record holds them (lib.lua `format_record`):
--          "<length>:<category><length>:<operation>", lengths in bytes (built in Rust)
-- ARGV[4]  the usage counter's name after the day (lib.lua `usage_field`):
--          ":<length of the category>:<category><operation>" (built in Rust)
-- ARGV[5]  the end of the charge's history entry, from the operation on, as JSON text:
--          `"operation":…,"category":…,"request_id":…,"charge_id":…}` (built once, in Rust)
-- ARGV[6]  idempotency key            (these three only with KEYS[2])
-- ARGV[7]  request fingerprint
-- ARGV[8]  idempotency lease, seconds: how long the first request with the key may run
--
-- The running config's low-credit thresholds, most auto top-ups per period and top-up packages
-- are constants of the library (lib.lua THRESHOLDS, AUTO_TOPUP_MAX, PACKAGES), as is the
-- idempotency record's retention (IDEM_RETENTION): every argument costs Redis about as much to
-- take in as a small command, and these are the same for every charge.
--
-- Reply, "charged": one string of nine little-endian doubles (lib.lua `receipt`; every other
-- outcome is an array):
--   events, cost, from_monthly, from_topup, monthly_remaining, topup_remaining, allocation,
--   renews_at, auto_topup_credits (0: none)
-- or, from the common case (`fast_receipt`: no events, cost = from_monthly + from_topup, no
-- auto top-up), six: from_monthly, from_topup, monthly_remaining, topup_remaining, allocation,
-- renews_at.
-- Otherwise, first the number of outbox events appended, then the outcome:
--   { events, "refunded" }                 this charge id was refunded (or tombstoned) before
--   { events, "refused", remaining, renews_at }
--   { events, "replay", status, headers JSON, body, remaining, allocation }
--   { events, "in_progress", seconds left of the first request's lease }
--   { events, "reused" }                   the key's charge stands, its answer was not kept
--   { events, "conflict" }
--   { 0, "noaccount" }
-- (events other than 0 on a non-charging outcome: the step renewed the account.)
--
-- "charged" with an existing charge record is a re-sent step (a client library retrying after a
-- lost reply): the original receipt, auto top-up included, nothing debited again. The
-- idempotency record (state "running" until its lease, then "done" with the answer or "gone",
-- written by idem_complete.lua) decides what a repeat of the client's key gets. This script
-- reads only the keys it declares, plus keys named from KEYS[1] (same hash tag, same slot; see
-- src/ledger/keys.rs): the charge record buckets (lib.lua), the usage hash of the current
-- period, history and outbox.
--
-- Same steps as memory.rs `Account::charge`, `auto_topup` and `thresholds`.

-- The common case first (lib.lua `fast_charge`); the general way below for everything else.
local fast, state, now = fast_charge(KEYS, ARGV)
if fast then return fast end

local a = load_account(KEYS[1], true, state, now)
if not a then return { 0, 'noaccount' } end

local charge_id, cost = ARGV[1], tonumber(ARGV[2])
local idem_key = false
if #KEYS == 2 then idem_key = ARGV[6] end

-- Reads and checks.
local prior, _, bucket, bucket_number = find_record(a, charge_id)
if prior then
  local r = parse_record(prior)
  if r.refunded then return { save_if_renewed(a), 'refunded' } end
  local auto = r.auto
  if auto == 0 then auto = false end
  return charge_receipt(a, save_if_renewed(a), r.cost, r.from_monthly, r.from_topup, auto)
end
if idem_key then
  local hit = idem_hit(a, KEYS[2], ARGV[7])
  if hit then return hit end
end
local before = a.monthly + a.topup
if before < cost then
  return { save_if_renewed(a), 'refused', before, renews_at(a) }
end
-- The step, in memory.
local from_monthly = math.min(cost, a.monthly)
local from_topup = cost - from_monthly
a.monthly = a.monthly - from_monthly
a.topup = a.topup - from_topup
a.used = a.used + cost
local day = div(a.now, 86400)
-- Appended: a renewal this charge triggered has queued its own entry first.
a.hist = a.hist + 1
a.entries[#a.entries + 1] = charge_blob(from_monthly, from_topup, a.period, day, a.hist, a.now, a.monthly, a.topup)
  .. ARGV[5]

-- Auto top-up: only the charge that takes the total from at-or-above the threshold to below it
-- buys — or, once, the first charge that ends below it after the setting was switched on while
-- already below ("armed") — at most AUTO_TOPUP_MAX times per period.
local auto_credits = false
local auto = a.auto
local after = a.monthly + a.topup
local auto_off = false
if auto and auto.enabled and after < auto.threshold and (before >= auto.threshold or auto.armed)
    and a.auto_count < AUTO_TOPUP_MAX then
  -- The package as the running config defines it now; the customer agreed to the one saved
  -- with the setting, so one that changed or disappeared switches the setting off instead.
  local credits, price_json = string.match(PACKAGES, '\n' .. auto.package:gsub('%p', '%%%0') .. '=(%d+):([^\n]*)')
  if not credits or tonumber(credits) ~= auto.credits or price_json ~= auto.price_json then
    auto_off = true
    local reason = 'package_changed'
    if not credits then reason = 'package_removed' end
    add_event(a, 'auto_topup.disabled', json_object('package', auto.package, 'reason', reason))
  end
end
if auto and auto.enabled and after < auto.threshold and (before >= auto.threshold or auto.armed)
    and a.auto_count < AUTO_TOPUP_MAX and not auto_off then
  local payment_ref = 'auto:' .. charge_id
  a.topup = a.topup + auto.credits
  a.auto_count = a.auto_count + 1
  auto_credits = auto.credits
  add_entry(a, 'auto_topup', 0, auto.credits, { payment_ref = payment_ref, package = auto.package })
  add_event(a, 'auto_topup.purchased', json_object('package', auto.package, 'credits', auto.credits,
    'price_eur', { raw = auto.price_json }, 'payment_ref', payment_ref, 'topup_remaining', a.topup,
    'purchases_this_period', a.auto_count))
end
-- Disarm once the arming has been used, or once the balance is at or above the threshold (from
-- then on an ordinary crossing buys).
local disarm = auto and auto.armed and (auto_credits or auto_off or after >= auto.threshold)

-- Thresholds reached, each at most once per period (the period each last fired in is read only
-- for the thresholds reached). Thresholds are percentages of the allocation (0..100, validated
-- by the config), so above the allocation none is reached and nothing is looked at.
local newly_fired = {}
local remaining = a.monthly + a.topup
local reached, fired, fired_fields = thresholds_reached(KEYS[1], remaining, a.allocation)
for i, t in ipairs(reached or {}) do
  if tonumber(fired[i]) ~= a.period then
    newly_fired[#newly_fired + 1] = fired_fields[i]
    newly_fired[#newly_fired + 1] = n(a.period)
    local kind = 'credits.low'
    if t == 0 then kind = 'credits.exhausted' end
    add_event(a, kind, json_object('threshold', t, 'remaining', remaining, 'allocation', a.allocation,
      'renews_at', rfc3339(renews_at(a))))
  end
end

-- Writes. The record bucket's expiry is set by the account's first charge in it (the state
-- remembers which bucket it set, `xb`); a bucket outlives its time as current by a whole TTL.
local expire = a.xb ~= bucket_number
a.xb = bucket_number
if auto_off then a.auto_enabled = false end
local events = save(a)
if #newly_fired > 0 then redis.call('HSET', KEYS[1], unpack(newly_fired)) end
if disarm then redis.call('HSET', KEYS[1], 'auto_armed', '0') end
-- The usage counter and the charge record (what refund.lua and a re-sent step need).
write_charge(a.key, bucket, expire, charge_id, { cost = cost, from_monthly = from_monthly, from_topup = from_topup,
  period = a.period, day = day, auto = auto_credits, idem = idem_key }, ARGV[3], ARGV[4], ARGV[2])
if idem_key then start_idem(KEYS[2], ARGV[7], charge_id, a.now + tonumber(ARGV[8])) end
return charge_receipt(a, events, cost, from_monthly, from_topup, auto_credits)
