-- pending_events.lua: the oldest undelivered events of an account.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV[1]  at most this many
--
-- Reply: { events appended (a renewal's), "found", outbox length, events dropped since the last
--          call (the outbox was full, see lib.lua `save`), event JSON... } or { 0, "noaccount" }
--
-- The outbox cg:{acct:<id>}:outbox (named from KEYS[1]) is a list, oldest first. Renews first,
-- like every step (memory.rs runs each step after `renew`), so a due `credits.renewed` event is
-- already part of the answer.

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end
local events = save_if_renewed(a)

local outbox = sub_key(a, 'outbox')
local dropped = tonumber(redis.call('HGET', KEYS[1], 'odrop')) or 0
if dropped > 0 then redis.call('HDEL', KEYS[1], 'odrop') end
local reply = { events, 'found', redis.call('LLEN', outbox), dropped }
local max = tonumber(ARGV[1])
if max > 0 then
  for _, e in ipairs(redis.call('LRANGE', outbox, 0, max - 1)) do reply[#reply + 1] = e end
end
return reply
