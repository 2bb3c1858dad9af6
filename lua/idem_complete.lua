-- idem_complete.lua: records how the request that holds an idempotency key ended.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- KEYS[2]  idempotency record      cg:{acct:<id>}:idem:<key>
-- ARGV[1]  charge id of the request
-- ARGV[2]  "done" (its answer follows) or "gone" (not kept: too large, or the client left)
-- ARGV[3]  HTTP status ("done")
-- ARGV[4]  headers, JSON array of [name, value] pairs ("done")
-- ARGV[5]  body, raw bytes ("done")
--
-- Reply, first the number of outbox events appended (a renewal's), then the outcome:
--   { events, "stored" }
--   { events, "lost" }   the record is not this charge's running one (refunded, expired)
--   { 0, "lost" }        no such account
--
-- Not a balance change: the record keeps its expiry (set by charge.lua), only its state moves
-- from "running" to "done" or "gone". Same steps as memory.rs `complete_idempotent`.

local a = load_account(KEYS[1])
if not a then return { 0, 'lost' } end

-- Reads and checks.
local r = redis.call('HMGET', KEYS[2], 'charge_id', 'state')
local events = save_if_renewed(a)
if r[1] ~= ARGV[1] or r[2] ~= 'running' then return { events, 'lost' } end

-- Writes.
if ARGV[2] == 'done' then
  redis.call('HSET', KEYS[2], 'state', 'done', 'status', ARGV[3], 'headers', ARGV[4], 'body', ARGV[5])
else
  redis.call('HSET', KEYS[2], 'state', 'gone')
end
return { events, 'stored' }
