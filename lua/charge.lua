-- charge.lua: debits a cost all-or-nothing, monthly bucket first, then top-ups.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- KEYS[2]  charge record           cg:{acct:<id>}:charge:<charge id>
-- KEYS[3]  idempotency record      cg:{acct:<id>}:idem:<key>   (present iff the charge has an
--          idempotency key)
-- ARGV[1]  charge id
-- ARGV[2]  cost
-- ARGV[3]  operation
-- ARGV[4]  category
-- ARGV[5]  request id
-- ARGV[6]  idempotency key (ignored without KEYS[3])
-- ARGV[7]  request fingerprint (ignored without KEYS[3])
-- ARGV[8]  retention of charge and idempotency records, seconds
--
-- Reply, first element the outcome:
--   { "charged" | "replayed", charge_id, cost, from_monthly, from_topup,
--     monthly_remaining, topup_remaining, allocation, renews_at }
--   { "refused", remaining, renews_at }
--   { "conflict" }
--   { "noaccount" }
--
-- "charged" with an existing charge record is a re-sent step (a client library retrying after a
-- lost reply): the original split, nothing debited again. "replayed" is the client re-sending
-- under the same idempotency key; the idempotency record carries a copy of the split, so this
-- script reads only the keys it declares.

local a = load_account(KEYS[1])
if not a then return { 'noaccount' } end

local charge_id, cost = ARGV[1], tonumber(ARGV[2])
local idem_key = false
if #KEYS == 3 then idem_key = ARGV[6] end

local function receipt(outcome, id, c, from_monthly, from_topup)
  return { outcome, id, c, from_monthly, from_topup, a.monthly, a.topup, a.allocation, renews_at(a) }
end

-- Reads and checks.
local prior = redis.call('HMGET', KEYS[2], 'cost', 'from_monthly', 'from_topup')
if prior[1] then
  save_if_renewed(KEYS[1], a)
  return receipt('charged', charge_id, tonumber(prior[1]), tonumber(prior[2]), tonumber(prior[3]))
end
if idem_key then
  local idem = redis.call('HMGET', KEYS[3], 'fingerprint', 'charge_id', 'cost', 'from_monthly', 'from_topup')
  if idem[1] then
    save_if_renewed(KEYS[1], a)
    if idem[1] ~= ARGV[7] then return { 'conflict' } end
    return receipt('replayed', idem[2], tonumber(idem[3]), tonumber(idem[4]), tonumber(idem[5]))
  end
end
if a.monthly + a.topup < cost then
  save_if_renewed(KEYS[1], a)
  return { 'refused', a.monthly + a.topup, renews_at(a) }
end

-- Writes.
local from_monthly = math.min(cost, a.monthly)
local from_topup = cost - from_monthly
a.monthly = a.monthly - from_monthly
a.topup = a.topup - from_topup
a.used = a.used + cost
save(KEYS[1], a)

local ttl = ARGV[8]
redis.call('HSET', KEYS[2], 'cost', n(cost), 'from_monthly', n(from_monthly), 'from_topup', n(from_topup),
  'period', n(a.period), 'refunded', '0', 'operation', ARGV[3], 'category', ARGV[4],
  'request_id', ARGV[5], 'at', n(a.now))
redis.call('EXPIRE', KEYS[2], ttl)
if idem_key then
  redis.call('HSET', KEYS[2], 'idem', idem_key)
  redis.call('HSET', KEYS[3], 'fingerprint', ARGV[7], 'charge_id', charge_id, 'cost', n(cost),
    'from_monthly', n(from_monthly), 'from_topup', n(from_topup))
  redis.call('EXPIRE', KEYS[3], ttl)
end
return receipt('charged', charge_id, cost, from_monthly, from_topup)
