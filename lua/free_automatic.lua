-- free_automatic.lua: counts a free automatic refresh in the current period's usage, within its
-- allowance.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV[1]  operation
-- ARGV[2]  most free automatic refreshes of the operation per period, -1 for no limit
-- KEYS[2]  idempotency record      cg:{acct:<id>}:idem:<key>   (present iff the request has an
--          idempotency key)
-- ARGV[3]  request fingerprint (with KEYS[2])
--
-- Reply, first the number of outbox events appended (a renewal's), then the outcome:
--   { events, "free", count this period including this one }
--   { events, "over" }        the allowance is used up: nothing counted, the request is charged
--   { events, "replay" | "in_progress" | "reused" | "conflict", ... }   as charge.lua: the key was
--            used before (a retried refresh, see lib.lua `idem_hit`); nothing counted
--   { 0, "noaccount" }
--
-- The count is the field `f:<operation>` of the usage hash cg:{acct:<id>}:usage:<period> (named
-- from KEYS[1]: same hash tag, same slot), so it restarts with each period and goes with the
-- period's usage. Same steps as memory.rs `count_free_automatic`.

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end

-- Reads and checks.
if #KEYS == 2 then
  local hit = idem_hit(a, KEYS[2], ARGV[3])
  if hit then return hit end
end
local usage = sub_key(a, 'usage:' .. n(a.period))
local field = 'f:' .. ARGV[1]
local count = tonumber(redis.call('HGET', usage, field)) or 0
local max = tonumber(ARGV[2])
local events = save_if_renewed(a)
if max >= 0 and count >= max then return { events, 'over' } end

-- Writes.
return { events, 'free', redis.call('HINCRBY', usage, field, 1) }
