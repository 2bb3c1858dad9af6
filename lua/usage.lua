-- usage.lua: the usage of the current period and of earlier ones still kept.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV[1]  how many periods before the current one are wanted
--
-- Reply: { events appended (a renewal's), "found", anchor (Unix seconds), current period index,
--          fields of period k, fields of period k - 1, ... } or { 0, "noaccount" },
-- the fields of a period being its usage hash as { field, value, ... }: `t` total,
-- `c:<category>`, `o:<operation>`, `d:<UTC day number>` (empty when nothing was recorded).
--
-- The usage hashes cg:{acct:<id>}:usage:<period index> are named from KEYS[1] (same hash tag,
-- same slot; src/ledger/keys.rs). Only the periods inside the kept window (USAGE_PERIODS, as
-- memory.rs) are read, so this script makes at most USAGE_PERIODS reads however many periods
-- are wanted; src/ledger/redis.rs gives the older ones (all 0) and every period's dates, from the
-- anchor and the index, with crate::calendar (the calendar this file's prelude ports).

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end
local events = save_if_renewed(a)

local reply = { events, 'found', a.anchor_unix, a.period }
local oldest = math.max(a.period - tonumber(ARGV[1]), a.period - USAGE_PERIODS + 1)
for k = a.period, oldest, -1 do
  reply[#reply + 1] = redis.call('HGETALL', sub_key(a, 'usage:' .. n(k)))
end
return reply
