-- lib.lua: the prelude every ledger script starts with. src/ledger/redis.rs puts it and every
-- script into one Redis function library (Redis 7): this file runs once, when the library is
-- loaded, and each script becomes a registered function whose arguments are KEYS and ARGV. So
-- the locals defined here cost nothing per call; they must stay constants and functions.
-- Functions replicate their effects (what they wrote), so TIME may precede writes.
--
-- KEYS, ARGV: none of its own; it only defines locals: the calendar, the clock, a JSON writer,
-- and the account's load / renew / save, which also write its history entries and outbox
-- events (src/ledger/keys.rs has the key schema).
-- Reply: none (the script appended after it replies). Every ledger script's reply starts with
-- the number of outbox events it appended (`save` returns it), which src/ledger/redis.rs uses
-- to index the outbox.
--
-- Numbers: Redis Lua has only doubles. Unix seconds, day counts and credit amounts stay far below
-- 2^53, where doubles are exact integers; `div` floors with math.fmod, which is exact, instead of
-- math.floor(a / b), whose rounded quotient can land on the wrong integer. Numbers are written to
-- Redis through `n`, because the default number-to-string conversion may use exponent notation.

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

-- `n` of the numbers a charge names keys and fields with (UTC day, record bucket, period index),
-- remembered between calls (the library's locals live as long as it is loaded): string.format
-- costs Redis a good part of a small command, and these numbers change once a day or a month.
-- A pure function of the number, so no call depends on what another left behind; at most
-- TEXTS_KEPT are kept, then it starts over.
local TEXTS_KEPT = 4096
local texts, texts_kept = {}, 0
local function text_of(x)
  local t = texts[x]
  if t then return t end
  if texts_kept >= TEXTS_KEPT then texts, texts_kept = {}, 0 end
  t = n(x)
  texts[x] = t
  texts_kept = texts_kept + 1
  return t
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

-- RFC 3339 text of a Unix time, UTC, whole seconds (src/calendar.rs `rfc3339`).
local function rfc3339(ts)
  local days, s = div(ts, 86400)
  local y, m, d = civil_from_days(days)
  return string.format('%04d-%02d-%02dT%02d:%02d:%02dZ', y, m, d, div(s, 3600), div(s, 60) % 60, s % 60)
end

-- === clock ===

-- Redis TIME in whole seconds, never before `floor` (the highest "now" this account has seen,
-- which survives a failover to a replica whose clock is behind). `time`: TIME as read already.
local function clock(floor, time)
  local now = time or tonumber(redis.call('TIME')[1])
  if floor and floor > now then return floor end
  return now
end

-- === JSON (history entries and outbox events) ===
--
-- Built by hand rather than with cjson.encode on a table: cjson writes numbers with 14
-- significant digits (1e+15 for a large balance, which serde reads as a float), and a Lua table
-- has no member order. Here every integer goes through `n` (exact below 2^53), strings through
-- cjson.encode (escaping), and members come out in the order given.

-- Marks a member written as `null` (a Lua nil or false member is left out instead).
local JSON_NULL = {}

-- JSON text of an object from name, value, name, value, ...; a value is an integer, a string,
-- false (member left out), JSON_NULL, or { raw = <JSON text> } (inserted as is).
local function json_object(...)
  local out = {}
  for i = 1, select('#', ...), 2 do
    local name, v = select(i, ...)
    if v ~= nil and v ~= false then
      local text
      if type(v) == 'number' then
        text = n(v)
      elseif type(v) == 'string' then
        text = cjson.encode(v)
      elseif v == JSON_NULL then
        text = 'null'
      else
        text = v.raw
      end
      out[#out + 1] = cjson.encode(name) .. ':' .. text
    end
  end
  return '{' .. table.concat(out, ',') .. '}'
end

-- === the account hash (src/ledger/keys.rs) ===

-- Periods of usage kept: the current one and 12 before it. Filled in from the Rust constant
-- `ledger::USAGE_PERIODS` when the scripts are built (src/ledger/redis.rs `lua_prelude`).
local USAGE_PERIODS = {{USAGE_PERIODS}}

-- The store's limits (`ledger::StoreLimits`, from the running config), filled in the same way:
-- history entries kept per account, whether only exported entries may be trimmed, and
-- undelivered events kept per account.
local HISTORY_MAX = {{HISTORY_MAX}}
local HISTORY_EXPORTED_ONLY = {{HISTORY_EXPORTED_ONLY}}
local OUTBOX_MAX = {{OUTBOX_MAX}}
-- Queued jobs older than this many seconds expire unrun; expired records are kept this long.
local JOB_MAX_AGE = {{JOB_MAX_AGE}}
local JOB_RETENTION = {{JOB_RETENTION}}
-- Charge records live this many seconds (refunds and re-sent steps need them).
local CHARGE_TTL = {{CHARGE_TTL}}

-- The running config's charge policy (src/ledger/redis.rs `ChargePolicy`), filled in the same way
-- and the same for every charge, so not sent with each: the low-credit thresholds (percent of the
-- allocation, largest first, 0: exhausted) and the fields recording the period each last fired
-- in, the most auto top-ups per billing period, the top-up packages ("\n<name>=<credits>:<price
-- JSON>" each), and how long an idempotency record is kept (seconds).
local THRESHOLDS = {{THRESHOLDS}}
local THRESHOLD_FIELDS = {{THRESHOLD_FIELDS}}
local AUTO_TOPUP_MAX = {{AUTO_TOPUP_MAX}}
local PACKAGES = {{PACKAGES}}
local IDEM_RETENTION = {{IDEM_RETENTION}}

-- History entries trimmed together: the list may hold up to this many entries past HISTORY_MAX
-- (reads never show them, see `htrim` below), so the LTRIM runs once per batch, not per charge.
-- Filled in the same way (`ledger::StoreLimits::history_trim_batch`).
local HISTORY_TRIM_BATCH = {{HISTORY_TRIM_BATCH}}

-- The account's hot state, what every step reads and a charge writes, is one hash field `state`
-- (one HGET and one HSET per charge; Redis scans a small hash's fields one by one, so twelve
-- fields read and seven written cost it several times more than one of each). It holds 14
-- integers as MessagePack (cmsgpack, built into Redis), in two parts:
--
--   monthly topup used hist htrim now | period_end allocation period evt auto_count auto_enabled xb hphys
--
-- MessagePack because Lua turns decimal text into numbers with strtod and numbers into text with
-- sprintf, each of which costs Redis about as much as a command; cmsgpack reads and writes
-- integers directly (exact: every value stays below 2^53). The first part changes with every
-- charge; the second rarely, and is written back byte for byte unless one of its values changed.
-- `htrim`: history entries trimmed so far as readers see it (seq htrim + 1 is the oldest shown);
-- `hphys`: entries actually removed from the list (it holds seq hphys + 1 .. hist; see
-- HISTORY_TRIM_BATCH). `auto_enabled`: 1 or 0. `xb`: the charge record bucket whose expiry this
-- account has set (see charge.lua), -1 for none. To read it by hand:
--   EVAL "return {cmsgpack.unpack(redis.call('HGET', KEYS[1], 'state'))}" 1 'cg:{acct:<id>}'
--
-- Accounts written before `state` keep these values in fields of their own (STATE_FIELDS, the
-- first `save` moves them into `state`). The fields every other step may need (REST) are read by
-- a lean load (`load_account(key, true)`, the charge's hot path) only when the step turns out to
-- need them: a renewal, auto top-up switched on, or export-guarded history trimming.
local STATE_FIELDS = { 'monthly', 'topup', 'used', 'now', 'hist', 'htrim', 'period_end', 'allocation', 'period',
  'evt', 'auto_count', 'auto_enabled' }
local REST = { 'plan', 'pending_plan', 'pending_allocation', 'anchor', 'email', 'exp', 'auto_threshold',
  'auto_package', 'auto_credits', 'auto_price', 'auto_price_json', 'auto_armed' }
-- Each field's place in an HMGET of STATE_FIELDS or REST, by name (built once, when the library loads).
local function places(names)
  local at = {}
  for i = 1, #names do at[names[i]] = i end
  return at
end
local H, R = places(STATE_FIELDS), places(REST)

-- The `state` text's two parts from their values, and its 14 values (after the offset of its
-- second part) from the text: the one place that knows the layout.
local function state_head(monthly, topup, used, hist, htrim, now)
  return cmsgpack.pack(monthly, topup, used, hist, htrim, now)
end

local function state_tail(period_end, allocation, period, evt, auto_count, enabled, xb, hphys)
  return cmsgpack.pack(period_end, allocation, period, evt, auto_count, enabled, xb, hphys)
end

local function unpack_state(state)
  local rest_at, monthly, topup, used, hist, htrim, now = cmsgpack.unpack_limit(state, 6)
  local _, period_end, allocation, period, evt, auto_count, enabled, xb, hphys = cmsgpack.unpack_limit(state, 8, rest_at)
  return rest_at, monthly, topup, used, hist, htrim, now, period_end, allocation, period, evt, auto_count, enabled, xb,
    hphys
end

-- The `state` of account `a`; `rest`, when given, is the second part as read (unchanged).
local function state_text(a, rest)
  local enabled = 0
  if a.auto_enabled then enabled = 1 end
  return state_head(a.monthly, a.topup, a.used, a.hist, a.htrim, a.now)
    .. (rest or state_tail(a.period_end, a.allocation, a.period, a.evt, a.auto_count, enabled, a.xb, a.hphys))
end

-- Raises an error, before anything is read or written, while the account's slot is being moved
-- between Redis Cluster nodes (resharding): a key that never exists, asked for together with the
-- account key, makes Redis answer "non local key" on both sides of a migration (TRYAGAIN inside
-- the script), and nothing elsewhere. Without it a script could run on a half-moved account: on
-- the old node, write the balance and then fail on a list already moved (scripts do not roll
-- back); on the new node, read an empty charge record still on the old one and debit a re-sent
-- charge twice. src/ledger/redis.rs calls it first in every function and retries the refusal.
-- The probe key shares the key's hash tag, or makes the whole key its tag (the readiness probe's
-- `cg:readyz` has none), so both hash to one slot.
local function settled_slot(key)
  local open = string.find(key, '{', 1, true)
  local close = open and string.find(key, '}', open + 1, true)
  local probe = (close and close > open + 1) and (key .. ':~settled') or ('{' .. key .. '}:~settled')
  redis.call('EXISTS', key, probe)
end

-- Another key of the same account: `<account key>:<kind>` shares the account's hash tag, hence
-- its cluster slot, so a script may use it without declaring it in KEYS (src/ledger/keys.rs).
local function sub_key(a, kind)
  return a.key .. ':' .. kind
end

-- Queues a history entry (written by `save`) with the buckets as they are now; the fields of
-- `extra` (operation, category, request_id, charge_id, payment_ref, package, plan) are optional.
-- Same members and order as memory.rs `Account::entry` / `HistoryEntry`.
local function add_entry(a, kind, monthly_delta, topup_delta, extra)
  a.hist = a.hist + 1
  a.entries[#a.entries + 1] = json_object('seq', a.hist, 'kind', kind, 'at', a.now,
    'monthly_delta', monthly_delta, 'topup_delta', topup_delta, 'monthly_after', a.monthly,
    'topup_after', a.topup, 'operation', extra.operation, 'category', extra.category,
    'request_id', extra.request_id, 'charge_id', extra.charge_id, 'payment_ref', extra.payment_ref,
    'package', extra.package, 'plan', extra.plan)
end

-- Queues an outbox event (written by `save`), `data` being a JSON object text. The id comes from
-- a per-account counter: `evt_<account>_<n>`, as memory.rs `Account::event`.
local function add_event(a, kind, data)
  a.evt = a.evt + 1
  if not a.id then a.id = string.match(a.key, '^cg:{acct:(.*)}$') end
  a.events[#a.events + 1] = json_object('id', 'evt_' .. a.id .. '_' .. n(a.evt), 'type', kind,
    'account_id', a.id, 'created_at', a.now, 'data', { raw = data })
end

local function renews_at(a)
  return a.period_end
end

-- Reads the rest of the account (REST) into `a`.
local function load_rest(a)
  local v = redis.call('HMGET', a.key, unpack(REST))
  a.lean = false
  a.plan = v[R.plan]
  a.pending_plan = v[R.pending_plan]
  a.pending_allocation = tonumber(v[R.pending_allocation])
  a.anchor_unix = tonumber(v[R.anchor])
  a.email = v[R.email]
  a.exported = tonumber(v[R.exp]) or 0
  if v[R.auto_package] then
    a.auto = { enabled = a.auto_enabled, threshold = tonumber(v[R.auto_threshold]), package = v[R.auto_package],
      credits = tonumber(v[R.auto_credits]), price = v[R.auto_price], price_json = v[R.auto_price_json],
      armed = v[R.auto_armed] == '1' }
  end
end

-- Reads the account and moves it, in memory only, into the period containing now: the monthly
-- bucket is set to the allocation (no roll-over), a pending downgrade takes effect, the count of
-- auto top-ups restarts, and a `renewal` history entry and a `credits.renewed` event are queued.
-- The period index only moves forward, so a renewal never happens twice or backwards. Returns
-- nil when there is no such account. Nothing is written here: callers finish their reads and
-- checks first, then call `save`, which writes the account and everything queued.
--
-- `lean`: read only the state unless the step needs more (see REST); such an account has `lean`
-- set, no `plan`, `email` or `auto`, and `save` writes only the state. `state` and `time`, when
-- given, are the `state` field (false: none) and Redis TIME as the step read them already.
local function load_account(key, lean, state, time)
  local a
  if state == nil then state = redis.call('HGET', key, 'state') end
  if state then
    local rest_at, monthly, topup, used, hist, htrim, now, period_end, allocation, period, evt, auto_count, enabled, xb,
      hphys = unpack_state(state)
    a = { key = key, monthly = monthly, topup = topup, used = used, hist = hist, htrim = htrim, stored_now = now,
      period_end = period_end, allocation = allocation, period = period, evt = evt, auto_count = auto_count,
      auto_enabled = enabled == 1, xb = xb, hphys = hphys,
      -- `save` writes the second part back as it was unless one of its values changed (an
      -- array: Lua fills one several times faster than named fields).
      rest_at = rest_at, state = state,
      was = { period_end, allocation, period, evt, auto_count, enabled == 1, xb, hphys },
      -- `auto`, `renewed`, `pending_changed` start as nil (false).
      lean = true, entries = {}, events = {}, now = clock(now, time) }
  else
    local v = redis.call('HMGET', key, unpack(STATE_FIELDS))
    if not v[H.monthly] then return nil end
    -- Accounts created before history, events and auto top-up start their counts at 0; before
    -- `period_end` was kept, the calendar finds it.
    local htrim = tonumber(v[H.htrim]) or 0
    a = { key = key, monthly = tonumber(v[H.monthly]), topup = tonumber(v[H.topup]), used = tonumber(v[H.used]),
      hist = tonumber(v[H.hist]) or 0, htrim = htrim, stored_now = tonumber(v[H.now]),
      period_end = tonumber(v[H.period_end]), allocation = tonumber(v[H.allocation]), period = tonumber(v[H.period]),
      evt = tonumber(v[H.evt]) or 0, auto_count = tonumber(v[H.auto_count]) or 0,
      auto_enabled = v[H.auto_enabled] == '1', xb = -1, hphys = htrim, migrate = true,
      lean = true, entries = {}, events = {}, now = clock(tonumber(v[H.now]), time) }
  end
  local due = not (a.period_end and a.now < a.period_end)
  if not lean or due or a.auto_enabled or HISTORY_EXPORTED_ONLY then load_rest(a) end
  if not due then return a end
  a.anchor = anchor_from_unix(a.anchor_unix)
  local k = period_at(a.anchor, a.now)
  if k > a.period then
    if a.pending_plan then
      a.plan = a.pending_plan
      a.allocation = a.pending_allocation
      a.pending_plan = false
      a.pending_changed = true
    end
    local expired = a.monthly
    a.renewed_from = a.period
    a.period = k
    a.period_end = period_start(a.anchor, k + 1)
    a.monthly = a.allocation
    a.used = 0
    a.auto_count = 0
    a.renewed = true
    -- A renewal that leaves the total below the auto top-up threshold (a smaller plan) arms it,
    -- as switching it on does: the next charge buys.
    if a.auto and a.auto.enabled and a.monthly + a.topup < a.auto.threshold then
      a.auto.armed = true
      a.arm_set = true
    end
    add_entry(a, 'renewal', a.allocation - expired, 0, { plan = a.plan })
    add_event(a, 'credits.renewed', json_object('plan', a.plan, 'allocation', a.allocation,
      'expired_monthly', expired, 'topup_remaining', a.topup,
      'period_start', rfc3339(period_start(a.anchor, k)), 'renews_at', rfc3339(renews_at(a))))
  end
  -- The cached end is (re)written by `save`.
  a.period_end = period_start(a.anchor, a.period + 1)
  return a
end

-- History beyond HISTORY_MAX goes, oldest first, in the step that appends — with export on, only
-- entries already exported (seq <= exported). Readers show seq htrim + 1 .. hist; the list
-- holds seq hphys + 1 .. hist and drops the trimmed ones once they make a batch. Returns the new
-- htrim and hphys of an account with `hist` entries, and how many entries leave the list now.
local function history_trims(hist, htrim, hphys, exported)
  local trim = (hist - htrim) - HISTORY_MAX
  if HISTORY_EXPORTED_ONLY then trim = math.min(trim, exported - htrim) end
  if trim > 0 then htrim = htrim + trim end
  if htrim - hphys >= HISTORY_TRIM_BATCH then return htrim, htrim, htrim - hphys end
  return htrim, hphys, 0
end

-- Writes every account field a step may change, the clock high-water mark, the queued history
-- entries (RPUSH onto `:history`) and events (RPUSH onto `:outbox`); after a renewal it also
-- drops the usage of periods that fell out of the kept window (at most USAGE_PERIODS keys: only
-- the window before the renewal can hold any). Returns how many events it appended, which every
-- script passes on as the first element of its reply (src/ledger/redis.rs indexes the outbox).
local function save(a)
  local drop = 0
  if #a.entries > 0 then a.htrim, a.hphys, drop = history_trims(a.hist, a.htrim, a.hphys, a.exported) end
  local rest = false
  local was = a.was
  if was and was[1] == a.period_end and was[2] == a.allocation and was[3] == a.period and was[4] == a.evt
      and was[5] == a.auto_count and was[6] == a.auto_enabled and was[7] == a.xb and was[8] == a.hphys then
    rest = string.sub(a.state, a.rest_at + 1)
  end
  local state = state_text(a, rest)
  if a.lean then
    redis.call('HSET', a.key, 'state', state)
  else
    redis.call('HSET', a.key, 'state', state, 'plan', a.plan)
  end
  if a.migrate then redis.call('HDEL', a.key, unpack(STATE_FIELDS)) end
  if a.pending_changed then
    if a.pending_plan then
      redis.call('HSET', a.key, 'pending_plan', a.pending_plan, 'pending_allocation', n(a.pending_allocation))
    else
      redis.call('HDEL', a.key, 'pending_plan', 'pending_allocation')
    end
  end
  if a.arm_set then redis.call('HSET', a.key, 'auto_armed', '1') end
  if #a.entries > 0 then redis.call('RPUSH', sub_key(a, 'history'), unpack(a.entries)) end
  if drop > 0 then redis.call('LTRIM', sub_key(a, 'history'), drop, -1) end
  if #a.events > 0 then
    local length = redis.call('RPUSH', sub_key(a, 'outbox'), unpack(a.events))
    -- Past OUTBOX_MAX undelivered events the oldest go; pending_events.lua reports how many.
    if length > OUTBOX_MAX then
      redis.call('LTRIM', sub_key(a, 'outbox'), length - OUTBOX_MAX, -1)
      redis.call('HINCRBY', a.key, 'odrop', n(length - OUTBOX_MAX))
    end
  end
  if a.renewed then
    local old = {}
    for j = a.renewed_from - USAGE_PERIODS + 1, math.min(a.renewed_from, a.period - USAGE_PERIODS) do
      old[#old + 1] = sub_key(a, 'usage:' .. n(j))
    end
    if #old > 0 then redis.call('DEL', unpack(old)) end
  end
  local events = #a.events
  a.entries, a.events = {}, {}
  return events
end

-- For steps that end without a balance change: persist a renewal if one happened (a read
-- shows the new period, so the store must hold it too); otherwise write nothing. Returns how
-- many events it appended.
local function save_if_renewed(a)
  if a.renewed then return save(a) end
  return 0
end

-- === charges ===

-- Whether remaining * 100 <= allocation * t, exactly: directly while both products stay below
-- 2^53 (exact doubles); beyond, with allocation = 100 q + r this is remaining - floor(r t / 100)
-- <= q t, whose sides stay exact doubles for amounts below 2^53.
local function at_or_below(remaining, allocation, t)
  if remaining < 90071992547409 and allocation < 90071992547409 then return remaining * 100 <= allocation * t end
  local q, r = div(allocation, 100)
  return remaining - div(r * t, 100) <= q * t
end

-- The low-credit thresholds an account with `remaining` of `allocation` credits left has reached
-- (a list, largest first), for each the period it last fired in (from the account hash `key`, as
-- HMGET answers) and the field that holds it, or nil when it has reached none. Thresholds are largest first: once
-- one is not reached, no smaller one is (0 is reached only at 0 left).
local function thresholds_reached(key, remaining, allocation)
  if remaining > allocation then return nil end
  local reached, fields
  for i = 1, #THRESHOLDS do
    local t = THRESHOLDS[i]
    if not ((t == 0 and remaining == 0) or (t > 0 and at_or_below(remaining, allocation, t))) then break end
    if not reached then reached, fields = {}, {} end
    reached[#reached + 1] = t
    fields[#fields + 1] = THRESHOLD_FIELDS[i]
  end
  if not reached then return nil end
  return reached, redis.call('HMGET', key, unpack(fields)), fields
end

-- charge.lua's "charged" reply (see there): nine numbers in one string, each a little-endian
-- IEEE double (exact: every value stays below 2^53). One string instead of an array of eleven,
-- because Redis turns a Lua table into a reply field by field, after looking up seven special
-- keys in it ("err", "ok", "map" ...), which cost it more than the rest of a command. The fast
-- way's (fast_receipt) leaves out what it knows: no events, the cost is from_monthly +
-- from_topup, no auto top-up.
local function fast_receipt(from_monthly, from_topup, monthly, topup, allocation, period_end)
  return struct.pack('<dddddd', from_monthly, from_topup, monthly, topup, allocation, period_end)
end

local function receipt(events, cost, from_monthly, from_topup, monthly, topup, allocation, period_end, auto_credits)
  return struct.pack('<ddddddddd', events, cost, from_monthly, from_topup, monthly, topup, allocation, period_end,
    auto_credits or 0)
end

-- The "charged" reply for account `a`.
local function charge_receipt(a, events, cost, from_monthly, from_topup, auto_credits)
  return receipt(events, cost, from_monthly, from_topup, a.monthly, a.topup, a.allocation, renews_at(a), auto_credits)
end

-- A charge's history entry and (on the fast way) its record start from one MessagePack text of
-- eight numbers, packed once: from_monthly, from_topup, period, day (the record's), seq, at,
-- monthly_after, topup_after (the entry's): "n", that text, then the entry's `tail` (the
-- request's part of add_entry's JSON, from the operation on, prebuilt in Rust) or the record's
-- names and idempotency key. No sprintf per number on the hot path, and cmsgpack.pack costs
-- Redis about 700 instructions per value (it makes a string of each and joins them). Such a
-- record's cost is from_monthly + from_topup; it has bought no auto top-up and is not refunded
-- (a refund rewrites it in the "m" form). `entry_json` makes the JSON when an entry is read;
-- entries written before hold seq, at, monthly_delta, topup_delta, monthly_after, topup_after
-- after a "c".
local function charge_blob(from_monthly, from_topup, period, day, seq, now, monthly, topup)
  return 'n' .. cmsgpack.pack(from_monthly, from_topup, period, day, seq, now, monthly, topup)
end

-- A history entry as the list holds it, as JSON (add_entry's members and order): a compact charge
-- entry is expanded, one written as JSON (they start with "{") is returned as it is.
local function entry_json(e)
  local form = string.byte(e, 1)
  local at, seq, now, monthly_delta, topup_delta, monthly_after, topup_after
  if form == 110 then
    local _
    at, monthly_delta, topup_delta, _, _, seq, now, monthly_after, topup_after = cmsgpack.unpack_limit(e, 8, 1)
    monthly_delta, topup_delta = -monthly_delta, -topup_delta
  elseif form == 99 then
    at, seq, now, monthly_delta, topup_delta, monthly_after, topup_after = cmsgpack.unpack_limit(e, 6, 1)
  else
    return e
  end
  return string.format('{"seq":%d,"kind":"charge","at":%d,"monthly_delta":%d,"topup_delta":%d,'
    .. '"monthly_after":%d,"topup_after":%d,', seq, now, monthly_delta, topup_delta, monthly_after, topup_after)
    .. string.sub(e, at + 1)
end

-- === usage (cg:{acct:<id>}:usage:<period index>) ===
--
-- One counter per day, category and operation: `u:<UTC day number>:<length of the category>:
-- <category><operation>` (names may hold any character, so the category is length-prefixed), so a
-- charge is one HINCRBY (charge.lua gets the name after the day prebuilt from Rust; refunds build
-- it here). src/ledger/redis.rs `period_usage` sums the counters by day, category
-- and operation; hashes written before kept `c:`, `o:`, `d:` (and `t`) counters, which it adds in.
local function usage_field(day, category, operation)
  return 'u:' .. text_of(day) .. ':' .. n(#category) .. ':' .. category .. operation
end

-- === charge records (cg:{acct:<id>}:charges:<bucket>) ===
--
-- One hash field per charge, named by the charge id, in the hash of the time bucket it was
-- written in (bucket = floor(now / CHARGE_TTL)). A bucket's hash expires 2 x CHARGE_TTL after it
-- was started, so a record lives between CHARGE_TTL and twice that, and a lookup reads the
-- current bucket and the one before. Adding a field to an existing hash is several times cheaper
-- for Redis than creating a key with its own expiry per charge, and smaller.
--
-- A record is one string: "m", then cost, from_monthly, from_topup, period, day, auto (credits
-- of the auto top-up it bought, 0 for none), refunded (1/0) as MessagePack integers (see the
-- account state), then the category and the operation (each as <length>:<text>) and the
-- idempotency key (the rest). The fast way's charges write "n" records instead (see
-- charge_blob). Records written before the MessagePack form hold the seven numbers as decimal
-- text, each followed by a space (they start with a digit).

-- The current bucket's hash, the previous one's, and the current bucket's number, for the
-- account hash `key` at `now`.
local function buckets_at(key, now)
  local b = div(now, CHARGE_TTL)
  return key .. ':charges:' .. text_of(b), key .. ':charges:' .. text_of(b - 1), b
end

local function record_buckets(a)
  return buckets_at(a.key, a.now)
end

-- The record of charge `id` and the hash holding it, or nil; then the current bucket's hash and
-- number.
local function find_record(a, id)
  local current, previous, b = record_buckets(a)
  local v = redis.call('HGET', current, id)
  if v then return v, current, current, b end
  v = redis.call('HGET', previous, id)
  if v then return v, previous, current, b end
  return nil, nil, current, b
end

-- The record text of `r`. `names`, when given, is its "<length>:<category><length>:<operation>"
-- part, built by the caller.
local function format_record(r, names)
  names = names or (n(#r.category) .. ':' .. r.category .. n(#r.operation) .. ':' .. r.operation)
  return 'm' .. cmsgpack.pack(r.cost, r.from_monthly, r.from_topup, r.period, r.day, r.auto or 0, r.refunded and 1 or 0)
    .. names .. (r.idem or '')
end

local function parse_record(v)
  local cost, fm, ft, period, day, auto, refunded, rest
  local form = string.byte(v, 1)
  if form == 110 then
    local at
    at, fm, ft, period, day = cmsgpack.unpack_limit(v, 8, 1)
    cost, auto, refunded = fm + ft, 0, false
    rest = string.sub(v, at + 1)
  elseif form == 109 then
    local at
    at, cost, fm, ft, period, day, auto, refunded = cmsgpack.unpack_limit(v, 7, 1)
    rest = string.sub(v, at + 1)
    refunded = refunded == 1
  else
    cost, fm, ft, period, day, auto, refunded, rest = string.match(v, '^(%d+) (%d+) (%d+) (%-?%d+) (%d+) (%d+) (%d) (.*)$')
    cost, fm, ft, period, day, auto = tonumber(cost), tonumber(fm), tonumber(ft), tonumber(period), tonumber(day),
      tonumber(auto)
    refunded = refunded == '1'
  end
  local cat_len, rest2 = string.match(rest, '^(%d+):(.*)$')
  local category = string.sub(rest2, 1, tonumber(cat_len))
  local op_len, rest3 = string.match(string.sub(rest2, tonumber(cat_len) + 1), '^(%d+):(.*)$')
  local operation = string.sub(rest3, 1, tonumber(op_len))
  local idem = string.sub(rest3, tonumber(op_len) + 1)
  if idem == '' then idem = false end
  return { cost = cost, from_monthly = fm, from_topup = ft, period = period, day = day, auto = auto,
    refunded = refunded, category = category, operation = operation, idem = idem }
end

-- Writes record `r` of charge `id` into `bucket` (`names`: see format_record), and the bucket's
-- expiry when `expire`.
local function write_record(bucket, id, r, names, expire)
  redis.call('HSET', bucket, id, format_record(r, names))
  if expire then redis.call('EXPIRE', bucket, 2 * CHARGE_TTL, 'NX') end
end

-- A charge's usage counter (`usage_tail`: the counter's name after the day, built in Rust).
local function count_usage(key, period, day, usage_tail, cost_text)
  redis.call('HINCRBY', key .. ':usage:' .. text_of(period), 'u:' .. text_of(day) .. usage_tail, cost_text)
end

-- A charge's writes besides the account's and its history entry: its usage counter and its
-- record `r` in `bucket` (`names`: the record's category and operation part, built in Rust), the
-- bucket's expiry set when `expire`.
local function write_charge(key, bucket, expire, id, r, names, usage_tail, cost_text)
  count_usage(key, r.period, r.day, usage_tail, cost_text)
  write_record(bucket, id, r, names, expire)
end

-- The idempotency record of a charge just made: the key's first request runs until `lease_end`
-- (idem_complete.lua then keeps its answer).
local function start_idem(key, fingerprint, charge_id, lease_end)
  redis.call('HSET', key, 'fingerprint', fingerprint, 'charge_id', charge_id, 'state', 'running', 'until', n(lease_end))
  redis.call('EXPIRE', key, IDEM_RETENTION)
end

-- charge.lua's common case, in local variables (Lua reads and writes them several times faster
-- than the fields of the account table `load_account` builds, which alone cost a charge about as
-- much as two commands; a Lua table costs about a small command to build and collect): an
-- account in the current layout, no renewal due, auto top-up off, no export guard on trimming, a
-- fresh charge id (and idempotency key, if any), and no low-credit threshold reached that has
-- not fired yet this period. Then it charges (or refuses) and returns the reply. For anything
-- else it returns nil having written nothing, then the `state` field (false: none) and the time
-- it read, if it got that far, and charge.lua takes the general way with them. The same steps
-- as the general way; conformance tests run both.
local function fast_charge(KEYS, ARGV)
  if HISTORY_EXPORTED_ONLY then return nil end
  local key = KEYS[1]
  local state = redis.call('HGET', key, 'state')
  if not state then return nil, false end
  local rest_at, monthly, topup, used, hist, htrim, now, period_end, allocation, period, evt, auto_count, enabled, xb,
    hphys = unpack_state(state)
  now = clock(now)
  if enabled == 1 or now >= period_end then return nil, state, now end
  local id, cost = ARGV[1], tonumber(ARGV[2])
  -- A charge id known already (a re-sent step, a refunded id) is answered the general way: one
  -- in the previous record bucket is looked up here, one in the current bucket found by the
  -- record's HSETNX below, before anything is written.
  local current, previous, b = buckets_at(key, now)
  if redis.call('HGET', previous, id) then return nil, state, now end
  -- A key used before is answered the general way (replay, conflict, in progress).
  local idem_key = #KEYS == 2 and ARGV[6]
  if idem_key and redis.call('EXISTS', KEYS[2]) == 1 then return nil, state, now end
  local remaining = monthly + topup - cost
  if remaining < 0 then
    if redis.call('HEXISTS', current, id) == 1 then return nil, state, now end
    return { 0, 'refused', monthly + topup, period_end }
  end
  -- A threshold reached for the first time this period raises an event: the general way.
  local reached, fired = thresholds_reached(key, remaining, allocation)
  if reached then
    for i = 1, #reached do
      if tonumber(fired[i]) ~= period then return nil, state, now end
    end
  end
  local from_monthly = math.min(cost, monthly)
  local from_topup = cost - from_monthly
  local day = div(now, 86400)
  monthly, topup, used, hist = monthly - from_monthly, topup - from_topup, used + cost, hist + 1
  local blob = charge_blob(from_monthly, from_topup, period, day, hist, now, monthly, topup)
  -- The charge record first: HSETNX writes nothing for an id the current bucket holds already.
  if redis.call('HSETNX', current, id, blob .. ARGV[3] .. (idem_key or '')) == 0 then return nil, state, now end
  if xb ~= b then redis.call('EXPIRE', current, 2 * CHARGE_TTL, 'NX') end
  local new_hphys, drop
  htrim, new_hphys, drop = history_trims(hist, htrim, hphys, 0)
  local rest
  if xb == b and new_hphys == hphys then
    rest = string.sub(state, rest_at + 1)
  else
    rest = state_tail(period_end, allocation, period, evt, auto_count, enabled, b, new_hphys)
  end
  redis.call('HSET', key, 'state', state_head(monthly, topup, used, hist, htrim, now) .. rest)
  redis.call('RPUSH', key .. ':history', blob .. ARGV[5])
  if drop > 0 then redis.call('LTRIM', key .. ':history', drop, -1) end
  count_usage(key, period, day, ARGV[4], ARGV[2])
  if idem_key then start_idem(KEYS[2], ARGV[7], id, now + tonumber(ARGV[8])) end
  return fast_receipt(from_monthly, from_topup, monthly, topup, allocation, period_end)
end

-- === queued jobs (cg:{acct:<id>}:job:<id>) ===

-- The bytes a queued job counts against the account's `qbytes` (method, path, headers and body,
-- as src/ledger/jobs.rs `stored_bytes` counts them, kept as `qsize` when queued; a job queued
-- before `qsize` was kept counts its body).
local function queued_size(key)
  local size = tonumber(redis.call('HGET', key, 'qsize'))
  if size then return size end
  return redis.call('HSTRLEN', key, 'body')
end

-- ===== end of lib.lua =====

-- === idempotency records (cg:{acct:<id>}:idem:<key>) ===

-- What a used idempotency key answers, as a reply to return as is, or nil for a fresh key (or
-- one whose record expired). The record's `state`: "running" until `until` (the first request's
-- lease), "done" with the answer to replay (status, headers, body), or "gone" (the charge stands,
-- the answer was not kept). Same rule as memory.rs `Account::idem_hit`.
local function idem_hit(a, key, fingerprint)
  local r = redis.call('HMGET', key, 'fingerprint', 'state', 'until', 'status', 'headers', 'body')
  if not r[1] then return nil end
  local events = save_if_renewed(a)
  if r[1] ~= fingerprint then return { events, 'conflict' } end
  if r[2] == 'done' then
    return { events, 'replay', tonumber(r[4]), r[5], r[6], a.monthly + a.topup, a.allocation }
  end
  if r[2] == 'running' and tonumber(r[3]) > a.now then
    return { events, 'in_progress', tonumber(r[3]) - a.now }
  end
  return { events, 'reused' }
end
