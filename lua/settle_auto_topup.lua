-- settle_auto_topup.lua: settles the payment of an auto top-up (the charge script credited it at
-- once; the payment is made afterwards, off-session). Once per payment reference: the first
-- report wins, a repeat gets the first settlement back whatever it reports.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- KEYS[2]  settlement record       cg:{acct:<id>}:autopay:<payment ref> (kept, like top-up receipts)
-- ARGV[1]  payment reference of the auto top-up ("auto:<charge id>")
-- ARGV[2]  credits the auto top-up added
-- ARGV[3]  "paid" or "failed"
-- ARGV[4]  the payment id ("paid") or why it failed ("failed")
--
-- Reply, first the number of outbox events appended, then the outcome:
--   { events, "paid", payment_id }
--   { events, "reversed", taken_back, topup_remaining }
--   { 0, "noaccount" }
--
-- A failed payment takes the credits back from the top-up bucket as far as they are unspent,
-- switches auto top-up off (and disarms it), marks the card failed, and writes an
-- `auto_topup_reversed` history entry and an `auto_topup.payment_failed` event
-- (memory.rs `Account::settle_auto_topup`).

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end

-- Reads and checks.
local r = redis.call('HMGET', KEYS[2], 'settled', 'payment_id', 'taken_back', 'topup_remaining')
if r[1] == 'paid' then return { save_if_renewed(a), 'paid', r[2] } end
if r[1] == 'reversed' then return { save_if_renewed(a), 'reversed', tonumber(r[3]), tonumber(r[4]) } end
if ARGV[3] == 'paid' then
  local events = save_if_renewed(a)
  redis.call('HSET', KEYS[2], 'settled', 'paid', 'payment_id', ARGV[4])
  return { events, 'paid', ARGV[4] }
end

-- The step, in memory.
local credits = tonumber(ARGV[2])
local taken = math.min(credits, a.topup)
a.topup = a.topup - taken
add_entry(a, 'auto_topup_reversed', 0, -taken, { payment_ref = ARGV[1] })
add_event(a, 'auto_topup.payment_failed', json_object('payment_ref', ARGV[1], 'credits', credits,
  'taken_back', taken, 'topup_remaining', a.topup, 'reason', ARGV[4]))

-- Writes.
a.auto_enabled = false
local events = save(a)
redis.call('HSET', KEYS[1], 'auto_armed', '0', 'bill_failed', '1')
redis.call('HSET', KEYS[2], 'settled', 'reversed', 'taken_back', n(taken), 'topup_remaining', n(a.topup))
return { events, 'reversed', taken, a.topup }
