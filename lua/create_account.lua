-- create_account.lua: creates an account; nothing happens when the id exists already.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV[1]  plan
-- ARGV[2]  allocation (monthly credits)
-- ARGV[3]  billing anchor, Unix seconds
-- ARGV[4]  "1" when an e-mail is given, else "0"
-- ARGV[5]  e-mail (ignored when ARGV[4] is "0")
--
-- Reply: { events appended (always 0), 1 created | 0 the account exists }
-- Also writes history entry 1, kind `created` (cg:{acct:<id>}:history, named from KEYS[1]).

if redis.call('EXISTS', KEYS[1]) == 1 then return { 0, 0 } end

local allocation = tonumber(ARGV[2])
local anchor = tonumber(ARGV[3])
local now = clock(nil)
-- An anchor in the future puts "now" in period -1, which ends at the anchor.
local parts = anchor_from_unix(anchor)
local period = period_at(parts, now)

-- The state as lib.lua `save` writes it; the first history entry is seq 1, nothing trimmed, no
-- events, auto top-up off, no charge record bucket yet.
local a = { monthly = allocation, topup = 0, used = 0, hist = 1, htrim = 0, now = now,
  period_end = period_start(parts, period + 1), allocation = allocation, period = period, evt = 0, auto_count = 0,
  auto_enabled = false, xb = -1, hphys = 0 }
redis.call('HSET', KEYS[1], 'plan', ARGV[1], 'anchor', n(anchor), 'created_at', n(now),
  'state', state_text(a))
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'email', ARGV[5]) end
redis.call('RPUSH', KEYS[1] .. ':history', json_object('seq', 1, 'kind', 'created', 'at', now,
  'monthly_delta', allocation, 'topup_delta', 0, 'monthly_after', allocation, 'topup_after', 0,
  'plan', ARGV[1]))
return { 0, 1 }
