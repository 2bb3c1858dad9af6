-- job_enqueue.lua: queues a job at the tail of its account's queue, unless the queue is full.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- KEYS[2]  job record              cg:{acct:<id>}:job:<job id>
-- ARGV[1]  job id
-- ARGV[2]  operation
-- ARGV[3]  category
-- ARGV[4]  cost
-- ARGV[5]  upstream name
-- ARGV[6]  HTTP method
-- ARGV[7]  path and query
-- ARGV[8]  request headers, JSON array of [name, value] pairs (stored as is)
-- ARGV[9]  request body (raw bytes)
-- ARGV[10] request id
-- ARGV[11] most jobs the account may have queued or running
-- ARGV[12] most bytes the account's queued and running jobs may hold together
-- ARGV[13] the bytes this job holds (method, path, headers and body: src/ledger/jobs.rs
--          `stored_bytes`), counted against ARGV[12]
-- KEYS[3]  idempotency record      cg:{acct:<id>}:idem:<key>   (present iff the request has an
--          idempotency key)
-- ARGV[14] request fingerprint (with KEYS[3])
-- ARGV[15] headers of the 202 answer, JSON array of [name, value] pairs (with KEYS[3])
-- ARGV[16] retention of the idempotency record, seconds (with KEYS[3])
--
-- Reply, first the number of outbox events appended (a renewal's), then the outcome:
--   { events, "queued", queue length after }
--   { events, "full" }          ARGV[11] jobs wait already
--   { events, "full_bytes" }    this job would take the account past ARGV[12] bytes
--   { events, "replay" | "in_progress" | "reused" | "conflict", ... }   as charge.lua: the key
--            was used before (see lib.lua `idem_hit`); nothing queued
--   { 0, "noaccount" }
--
-- With an idempotency key the 202 answer ({"job_id", "status", "queue_depth"}, the same bytes
-- as src/ledger/jobs.rs `queued_response`) is stored as the key's answer in the same step, so a
-- repeat replays it: one job, charged once, however often the request is sent.
--
-- The queue cg:{acct:<id>}:queue (named from KEYS[1]) lists the ids of queued and running jobs,
-- oldest first. A job id that already has a record is a re-sent step (a client retrying after a
-- lost reply): it answers "queued" with the queue length and queues nothing again. Same steps as
-- memory.rs `enqueue_job` otherwise. src/ledger/redis.rs adds the account to the job index after.

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end

-- Reads and checks.
if #KEYS == 3 then
  local hit = idem_hit(a, KEYS[3], ARGV[14])
  if hit then return hit end
end
local queue = sub_key(a, 'queue')
local depth = redis.call('LLEN', queue)
if redis.call('EXISTS', KEYS[2]) == 1 then return { save_if_renewed(a), 'queued', depth } end
if depth >= tonumber(ARGV[11]) then return { save_if_renewed(a), 'full' } end
-- The bytes the queue holds (its jobs' requests), kept in the account hash: job_finish.lua,
-- job_claim.lua (expiry) and job_withdraw.lua give a job's back when its body is dropped.
local size = tonumber(ARGV[13])
local qbytes = tonumber(redis.call('HGET', KEYS[1], 'qbytes')) or 0
if qbytes + size > tonumber(ARGV[12]) then return { save_if_renewed(a), 'full_bytes' } end

-- Writes.
local events = save_if_renewed(a)
redis.call('HSET', KEYS[2], 'operation', ARGV[2], 'category', ARGV[3], 'cost', ARGV[4],
  'upstream', ARGV[5], 'method', ARGV[6], 'path', ARGV[7], 'headers', ARGV[8], 'body', ARGV[9],
  'request_id', ARGV[10], 'status', 'queued', 'not_before', n(a.now), 'attempts', '0',
  'created_at', n(a.now), 'updated_at', n(a.now), 'qsize', n(size))
local depth = redis.call('RPUSH', queue, ARGV[1])
redis.call('HINCRBY', KEYS[1], 'qbytes', n(size))
if #KEYS == 3 then
  -- The job remembers its key, so a withdrawal can forget the 202 (job_withdraw.lua).
  redis.call('HSET', KEYS[2], 'idem', KEYS[3])
  redis.call('HSET', KEYS[3], 'fingerprint', ARGV[14], 'state', 'done', 'status', '202', 'headers', ARGV[15],
    'body', json_object('job_id', ARGV[1], 'status', 'queued', 'queue_depth', depth))
  redis.call('EXPIRE', KEYS[3], ARGV[16])
end
return { events, 'queued', depth }
