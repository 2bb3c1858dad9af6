-- job_finish.lua: records how an attempt ended, if the runner still holds the job's lease.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- KEYS[2]  job record              cg:{acct:<id>}:job:<job id>
-- ARGV[1]  job id
-- ARGV[2]  runner id
-- ARGV[3]  "done", "failed", "retry" or "release"
-- ARGV[4]  seconds: the retention ("done", "failed") or the delay before the next attempt
--          ("retry"); ignored for "release"
-- ARGV[5]  the reason ("failed", "retry"); ignored otherwise
-- ARGV[6]  upstream status ("done"); ignored otherwise
-- ARGV[7]  upstream headers, JSON array of [name, value] pairs ("done"); ignored otherwise
-- ARGV[8]  upstream body, raw bytes ("done"); ignored otherwise
--
-- Reply, first the number of outbox events appended (a renewal's), then the outcome:
--   { events, "finished", queue length after }
--   { events, "lost" }   no such job, or ARGV[2] does not hold its lease: nothing changed
--   { 0, "noaccount" }
--
-- Same steps as memory.rs `finish_job`: only the lease owner is checked, not the lease's expiry
-- (a runner whose lease ran out may still finish while nobody else has claimed the job). The
-- lease goes in every case. "done" keeps the result, "failed" the reason, and both count an
-- attempt ("failed" only), leave the queue cg:{acct:<id>}:queue, drop the request body and
-- expire after the retention. "retry" counts an attempt, keeps the reason and waits ARGV[4]
-- seconds; "release" only puts the job back; both keep its place in the queue.

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end

-- Reads and checks.
local j = redis.call('HMGET', KEYS[2], 'lease_owner', 'attempts')
if j[1] ~= ARGV[2] then return { save_if_renewed(a), 'lost' } end
local kind, attempts = ARGV[3], tonumber(j[2])
if kind ~= 'done' and kind ~= 'failed' and kind ~= 'retry' and kind ~= 'release' then
  return redis.error_reply('job_finish: unknown outcome ' .. kind)
end

-- Writes.
local events = save_if_renewed(a)
local queue = sub_key(a, 'queue')
redis.call('HDEL', KEYS[2], 'lease_owner', 'lease_until')
redis.call('HSET', KEYS[2], 'updated_at', n(a.now))
if kind == 'done' then
  redis.call('HSET', KEYS[2], 'status', 'done', 'result_status', ARGV[6], 'result_headers', ARGV[7],
    'result_body', ARGV[8])
  redis.call('HDEL', KEYS[2], 'error')
elseif kind == 'failed' then
  redis.call('HSET', KEYS[2], 'status', 'failed', 'attempts', n(attempts + 1), 'error', ARGV[5])
elseif kind == 'retry' then
  redis.call('HSET', KEYS[2], 'status', 'queued', 'attempts', n(attempts + 1), 'error', ARGV[5],
    'not_before', n(a.now + tonumber(ARGV[4])))
else
  redis.call('HSET', KEYS[2], 'status', 'queued')
end
if kind == 'done' or kind == 'failed' then
  redis.call('HINCRBY', KEYS[1], 'qbytes', n(-queued_size(KEYS[2])))
  redis.call('HDEL', KEYS[2], 'body')
  redis.call('LREM', queue, 0, ARGV[1])
  redis.call('EXPIRE', KEYS[2], ARGV[4])
end
return { events, 'finished', redis.call('LLEN', queue) }
