-- refund.lua: returns a charge to the buckets it came from, once.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- KEYS[2]  the charge record as versions before the record buckets (lib.lua) kept it:
--          cg:{acct:<id>}:charge:<charge id>, a hash; read only when no bucket has the charge
-- ARGV[1]  charge id
--
-- Reply, first the number of outbox events appended (a renewal's), then the outcome:
--   { events, "refunded", to_monthly, to_topup, monthly_remaining, topup_remaining }
--   { events, "already" }   refunded before; nothing changed
--   { events, "unknown" }   no such account or charge (never made, or expired); for an existing
--                           account a tombstone is left (a refunded charge record of cost 0), so
--                           a charge that arrives late under this id answers "refunded"
--
-- The monthly part goes back only if the account is still in the charge's period (the bucket
-- was reset since); the top-up part always does. The usage of the charge's own period, day,
-- category and operation goes down by what was returned (never below 0), and a `refund` history entry is
-- written. A refunded request was not served, so the idempotency record pointing at this charge
-- is deleted and a retry under that key pays anew. The names of the idempotency record (from the
-- charge record) and of the usage hash (from the charge's period) cannot be declared in KEYS;
-- they are built from KEYS[1] and share its hash tag, hence its slot (src/ledger/keys.rs), which
-- Redis Cluster accepts for scripts. Same steps as memory.rs `Account::refund`.

local a = load_account(KEYS[1])
if not a then return { 0, 'unknown' } end

-- Reads and checks.
local record, bucket = find_record(a, ARGV[1])
local r
if record then
  r = parse_record(record)
else
  -- A record as earlier versions kept it: a hash of its own.
  local c = redis.call('HMGET', KEYS[2], 'cost', 'from_monthly', 'from_topup', 'period', 'idem', 'refunded',
    'operation', 'category', 'day', 'at')
  if c[1] then
    -- Records written before usage was recorded lack `day`; their `at` gives it.
    r = { cost = tonumber(c[1]), from_monthly = tonumber(c[2]), from_topup = tonumber(c[3]),
      period = tonumber(c[4]), idem = c[5], refunded = c[6] == '1', operation = c[7] or '',
      category = c[8] or '', day = tonumber(c[9]) or div(tonumber(c[10]) or a.now, 86400) }
  end
end
if not r then
  local events = save_if_renewed(a)
  write_record(record_buckets(a), ARGV[1], { cost = 0, from_monthly = 0, from_topup = 0, period = a.period,
    day = div(a.now, 86400), refunded = true, category = '', operation = '' }, nil, true)
  return { events, 'unknown' }
end
if r.refunded then return { save_if_renewed(a), 'already' } end
local idem_record = false
if r.idem then
  local key = KEYS[1] .. ':idem:' .. r.idem
  if redis.call('HGET', key, 'charge_id') == ARGV[1] then idem_record = key end
end
local cost, charge_period, day = r.cost, r.period, r.day
local operation, category = r.operation, r.category
local usage = sub_key(a, 'usage:' .. n(charge_period))
-- The charge's counter; a charge counted before there was one is in the older three.
local usage_fields = { usage_field(day, category, operation) }
local used = redis.call('HMGET', usage, usage_fields[1], 'c:' .. category, 'o:' .. operation, 'd:' .. n(day))
if not used[1] and used[2] then
  usage_fields = { 'c:' .. category, 'o:' .. operation, 'd:' .. n(day) }
  used = { used[2], used[3], used[4] }
end

-- The step, in memory.
local same_period = charge_period == a.period
local to_monthly, to_topup = 0, r.from_topup
if same_period then
  to_monthly = r.from_monthly
  a.used = math.max(a.used - cost, 0)
end
a.monthly = a.monthly + to_monthly
a.topup = a.topup + to_topup
add_entry(a, 'refund', to_monthly, to_topup, { operation = operation, category = category, charge_id = ARGV[1] })

-- Writes.
local events = save(a)
local usage_after = {}
for i, field in ipairs(usage_fields) do
  usage_after[#usage_after + 1] = field
  -- Only what actually came back leaves the usage: credits that expired with their period
  -- stay counted as used there, as the ledger shows them spent.
  usage_after[#usage_after + 1] = n(math.max((tonumber(used[i]) or 0) - (to_monthly + to_topup), 0))
end
redis.call('HSET', usage, unpack(usage_after))
if record then
  r.refunded, r.idem = true, false
  write_record(bucket, ARGV[1], r, nil, true)
else
  redis.call('HSET', KEYS[2], 'refunded', '1')
  redis.call('HDEL', KEYS[2], 'idem')
end
if idem_record then redis.call('DEL', idem_record) end
return { events, 'refunded', to_monthly, to_topup, a.monthly, a.topup }
