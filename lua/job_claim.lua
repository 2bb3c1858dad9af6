-- job_claim.lua: leases the oldest due, unleased job of an account to a runner.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV[1]  runner id
-- ARGV[2]  lease, seconds
-- ARGV[3]  how many ids at the head of the queue to look at
--
-- Reply, first the number of outbox events appended (a renewal's), then the outcome:
--   { events, "claimed", queue length, job id, operation, category, cost, upstream, method, path,
--     headers JSON, body, request_id, attempts, created_at }
--   { events, "none", queue length }   nothing due and unleased
--   { 0, "noaccount" }
--
-- Walks the queue cg:{acct:<id>}:queue (named from KEYS[1]) from its head and takes the first
-- job whose lease (if any) has expired and whose `not_before` has come: it becomes `running`,
-- leased to ARGV[1] until now + ARGV[2]. A lease that expired (its runner crashed) lets another
-- runner take the job; the job keeps its attempt count, so the charge id is the same. Same steps
-- as memory.rs `claim_job`, except that only the first ARGV[3] ids are looked at, to bound the
-- script's time. An id without a record (removed by hand) is dropped from the queue. A job not
-- running that waited JOB_MAX_AGE seconds (lib.lua, from `jobs.max_queue_age_hours`) expires
-- on the way: status "expired", its body dropped (and its bytes given back), out of the queue,
-- kept for JOB_RETENTION seconds so its client can read why.

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end

-- Reads and checks.
local queue = sub_key(a, 'queue')
local ids = redis.call('LRANGE', queue, 0, tonumber(ARGV[3]) - 1)
local chosen, job, dangling, expired = false, false, {}, {}
for _, id in ipairs(ids) do
  local key = sub_key(a, 'job:' .. id)
  local j = redis.call('HMGET', key, 'status', 'lease_until', 'not_before', 'created_at')
  if not j[1] then
    dangling[#dangling + 1] = id
  else
    local leased = j[2] and tonumber(j[2]) > a.now
    if not leased and a.now - (tonumber(j[4]) or a.now) >= JOB_MAX_AGE then
      expired[#expired + 1] = id
    elseif not leased and (tonumber(j[3]) or 0) <= a.now then
      chosen = id
      job = redis.call('HMGET', key, 'operation', 'category', 'cost', 'upstream', 'method', 'path',
        'headers', 'body', 'request_id', 'attempts', 'created_at')
      break
    end
  end
end

-- Writes.
local events = save_if_renewed(a)
for _, id in ipairs(dangling) do redis.call('LREM', queue, 0, id) end
for _, id in ipairs(expired) do
  local key = sub_key(a, 'job:' .. id)
  redis.call('HINCRBY', KEYS[1], 'qbytes', n(-queued_size(key)))
  redis.call('HDEL', key, 'body', 'lease_owner', 'lease_until')
  redis.call('HSET', key, 'status', 'expired', 'updated_at', n(a.now),
    'error', 'not run within ' .. n(div(JOB_MAX_AGE, 3600)) .. ' h of queueing')
  redis.call('LREM', queue, 0, id)
  redis.call('EXPIRE', key, JOB_RETENTION)
end
if not chosen then
  local left = redis.call('LLEN', queue)
  -- An empty queue holds no bytes: heals a count that lost track (a record removed by hand or
  -- evicted, whose bytes were never given back).
  if left == 0 then redis.call('HDEL', KEYS[1], 'qbytes') end
  return { events, 'none', left }
end
redis.call('HSET', sub_key(a, 'job:' .. chosen), 'status', 'running', 'lease_owner', ARGV[1],
  'lease_until', n(a.now + tonumber(ARGV[2])), 'updated_at', n(a.now))
return { events, 'claimed', redis.call('LLEN', queue), chosen, job[1], job[2], tonumber(job[3]), job[4],
  job[5], job[6], job[7], job[8], job[9], tonumber(job[10]), tonumber(job[11]) }
