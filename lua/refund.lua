-- refund.lua: returns a charge to the buckets it came from, once.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- KEYS[2]  charge record           cg:{acct:<id>}:charge:<charge id>
-- ARGV[1]  charge id
--
-- Reply:
--   { "refunded", to_monthly, to_topup, monthly_remaining, topup_remaining }
--   { "already" }   refunded before; nothing changed
--   { "unknown" }   no such account or charge (never made, or expired)
--
-- The monthly part goes back only if the account is still in the charge's period (the bucket
-- was reset since); the top-up part always does. A refunded request was not served, so the
-- idempotency record pointing at this charge is deleted and a retry under that key pays anew.
-- Its name comes from the charge record, so it cannot be declared in KEYS; it is built from
-- KEYS[1] and shares its hash tag, hence its slot (src/ledger/keys.rs), which Redis Cluster
-- accepts for scripts.

local a = load_account(KEYS[1])
if not a then return { 'unknown' } end

-- Reads and checks.
local c = redis.call('HMGET', KEYS[2], 'cost', 'from_monthly', 'from_topup', 'period', 'idem', 'refunded')
if not c[1] then
  save_if_renewed(KEYS[1], a)
  return { 'unknown' }
end
if c[6] == '1' then
  save_if_renewed(KEYS[1], a)
  return { 'already' }
end
local idem_record = false
if c[5] then
  local key = KEYS[1] .. ':idem:' .. c[5]
  if redis.call('HGET', key, 'charge_id') == ARGV[1] then idem_record = key end
end

-- Writes.
local cost, same_period = tonumber(c[1]), tonumber(c[4]) == a.period
local to_monthly, to_topup = 0, tonumber(c[3])
if same_period then
  to_monthly = tonumber(c[2])
  a.used = math.max(a.used - cost, 0)
end
a.monthly = a.monthly + to_monthly
a.topup = a.topup + to_topup
save(KEYS[1], a)
redis.call('HSET', KEYS[2], 'refunded', '1')
redis.call('HDEL', KEYS[2], 'idem')
if idem_record then redis.call('DEL', idem_record) end
return { 'refunded', to_monthly, to_topup, a.monthly, a.topup }
