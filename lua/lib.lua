-- lib.lua: the prelude every ledger script starts with (src/ledger/redis.rs prepends it).
--
-- KEYS, ARGV: none of its own; it only defines local functions.
-- Reply: none (the script appended after it replies).
--
-- Numbers: Redis Lua has only doubles. Unix seconds, day counts and credit amounts stay far below
-- 2^53, where doubles are exact integers; `div` floors with math.fmod, which is exact, instead of
-- math.floor(a / b), whose rounded quotient can land on the wrong integer. Numbers are written to
-- Redis through `n`, because the default number-to-string conversion may use exponent notation.

-- Redis 5 and 6 replicate scripts verbatim unless told otherwise, and then refuse a write after
-- TIME; Redis 7 always replicates effects and keeps this call only as a no-op.
if redis.replicate_commands then redis.replicate_commands() end

-- Floor division and the matching non-negative remainder, for b > 0.
local function div(a, b)
  local r = math.fmod(a, b)
  if r < 0 then r = r + b end
  return (a - r) / b, r
end

-- A whole number as decimal text, for HSET and friends.
local function n(x)
  return string.format('%d', x)
end

-- === calendar: a port of src/calendar.rs, same names, same integer steps ===

local function days_in_month(y, m)
  if m == 2 then
    if (y % 4 == 0 and y % 100 ~= 0) or y % 400 == 0 then return 29 end
    return 28
  end
  if m == 4 or m == 6 or m == 9 or m == 11 then return 30 end
  return 31
end

-- Days since 1970-01-01 of a civil date (H. Hinnant's algorithm).
local function days_from_civil(y, m, d)
  if m <= 2 then y = y - 1 end
  local era = div(y, 400)
  local yoe = y - era * 400
  local mp = (m + 9) % 12
  local doy = div(153 * mp + 2, 5) + d - 1
  local doe = yoe * 365 + div(yoe, 4) - div(yoe, 100) + doy
  return era * 146097 + doe - 719468
end

-- Civil date (year, month, day) of a day count since 1970-01-01.
local function civil_from_days(z)
  z = z + 719468
  local era = div(z, 146097)
  local doe = z - era * 146097
  local yoe = div(doe - div(doe, 1460) + div(doe, 36524) - div(doe, 146096), 365)
  local y = yoe + era * 400
  local doy = doe - (365 * yoe + div(yoe, 4) - div(yoe, 100))
  local mp = div(5 * doy + 2, 153)
  local d = doy - div(153 * mp + 2, 5) + 1
  local m
  if mp < 10 then m = mp + 3 else m = mp - 9 end
  if m <= 2 then y = y + 1 end
  return y, m, d
end

-- Anchor::from_unix: the anchor's civil parts.
local function anchor_from_unix(ts)
  local days, second_of_day = div(ts, 86400)
  local y, m, d = civil_from_days(days)
  return { year = y, month = m, day = d, second_of_day = second_of_day }
end

-- Anchor::period_start: start of period k, the day clamped to the month's length.
local function period_start(a, k)
  local y, m = div(a.year * 12 + (a.month - 1) + k, 12)
  m = m + 1
  local d = math.min(a.day, days_in_month(y, m))
  return days_from_civil(y, m, d) * 86400 + a.second_of_day
end

-- Anchor::period_at: the k with period_start(k) <= now < period_start(k + 1).
local function period_at(a, now)
  local y, m = civil_from_days(div(now, 86400))
  local k = (y * 12 + m - 1) - (a.year * 12 + a.month - 1)
  while period_start(a, k) > now do k = k - 1 end
  while period_start(a, k + 1) <= now do k = k + 1 end
  return k
end

-- === clock ===

-- Redis TIME in whole seconds, never before `floor` (the highest "now" this account has seen,
-- which survives a failover to a replica whose clock is behind).
local function clock(floor)
  local now = tonumber(redis.call('TIME')[1])
  if floor and floor > now then return floor end
  return now
end

-- === the account hash (src/ledger/keys.rs) ===

local FIELDS = { 'plan', 'allocation', 'pending_plan', 'pending_allocation', 'anchor', 'period',
  'monthly', 'topup', 'used', 'email', 'now' }

-- Reads the account and moves it, in memory only, into the period containing now: the monthly
-- bucket is set to the allocation (no roll-over) and a pending downgrade takes effect. The
-- period index only moves forward, so a renewal never happens twice or backwards. Returns nil
-- when there is no such account. Nothing is written here: callers finish their reads and
-- checks first, then call `save`.
local function load_account(key)
  local v = redis.call('HMGET', key, unpack(FIELDS))
  if not v[1] then return nil end
  local a = {
    plan = v[1],
    allocation = tonumber(v[2]),
    pending_plan = v[3],
    pending_allocation = tonumber(v[4]),
    anchor = anchor_from_unix(tonumber(v[5])),
    period = tonumber(v[6]),
    monthly = tonumber(v[7]),
    topup = tonumber(v[8]),
    used = tonumber(v[9]),
    email = v[10],
    renewed = false,
    pending_applied = false,
  }
  a.now = clock(tonumber(v[11]))
  local k = period_at(a.anchor, a.now)
  if k > a.period then
    if a.pending_plan then
      a.plan = a.pending_plan
      a.allocation = a.pending_allocation
      a.pending_plan = false
      a.pending_applied = true
    end
    a.period = k
    a.monthly = a.allocation
    a.used = 0
    a.renewed = true
  end
  return a
end

-- Writes every field a step may change, and the clock high-water mark.
local function save(key, a)
  redis.call('HSET', key, 'plan', a.plan, 'allocation', n(a.allocation), 'period', n(a.period),
    'monthly', n(a.monthly), 'topup', n(a.topup), 'used', n(a.used), 'now', n(a.now))
  if a.pending_applied then
    redis.call('HDEL', key, 'pending_plan', 'pending_allocation')
  end
end

-- For steps that end without a balance change: persist a renewal if one happened (a read
-- shows the new period, so the store must hold it too); otherwise write nothing.
local function save_if_renewed(key, a)
  if a.renewed then save(key, a) end
end

local function renews_at(a)
  return period_start(a.anchor, a.period + 1)
end

-- ===== end of lib.lua =====
