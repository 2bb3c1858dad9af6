-- job_withdraw.lua: withdraws a job whose queueing the gateway could not confirm — the reply of
-- job_enqueue.lua was lost, or came after the gateway stopped waiting — so a request answered
-- 503 `store_unavailable` never runs and is never paid. A job still queued leaves the queue (its
-- body and bytes given back); a job never queued (the enqueue has not arrived, or never will)
-- gets a record anyway, so an enqueue arriving late is a re-sent step that queues nothing. A job
-- already running or finished is left alone. A withdrawn job's Idempotency-Key forgets its 202
-- (nobody was told of the job), so the client's retry queues the request afresh.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- KEYS[2]  job record              cg:{acct:<id>}:job:<job id>
-- ARGV[1]  job id
--
-- Reply, first the number of outbox events appended (a renewal's), then the outcome:
--   { events, "withdrawn" }
--   { events, "started", status }   running, done, failed or expired: too late to withdraw
--   { 0, "noaccount" }
-- (memory.rs `withdraw_job`)

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end

-- Reads and checks.
local j = redis.call('HMGET', KEYS[2], 'status', 'lease_until', 'idem')
local leased = j[2] and tonumber(j[2]) > a.now
if j[1] == 'withdrawn' then return { save_if_renewed(a), 'withdrawn' } end
if j[1] and (j[1] ~= 'queued' or leased) then return { save_if_renewed(a), 'started', j[1] } end

-- Writes.
local events = save_if_renewed(a)
if j[1] then
  redis.call('HINCRBY', KEYS[1], 'qbytes', n(-queued_size(KEYS[2])))
  redis.call('HDEL', KEYS[2], 'body', 'lease_owner', 'lease_until')
  redis.call('LREM', sub_key(a, 'queue'), 0, ARGV[1])
  -- The key's record (same hash tag as the account) still replays this job's 202: forget it,
  -- unless the key has moved on to another request since.
  if j[3] then
    local body = redis.call('HGET', j[3], 'body')
    if body and string.find(body, '"job_id":"' .. ARGV[1] .. '"', 1, true) then redis.call('DEL', j[3]) end
  end
else
  redis.call('HSET', KEYS[2], 'operation', '', 'cost', '0', 'attempts', '0', 'created_at', n(a.now))
end
redis.call('HSET', KEYS[2], 'status', 'withdrawn', 'updated_at', n(a.now),
  'error', 'withdrawn: its request was answered 503 before the queueing was confirmed')
redis.call('EXPIRE', KEYS[2], JOB_RETENTION)
return { events, 'withdrawn' }
