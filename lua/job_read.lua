-- job_read.lua: a job as its account sees it.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- KEYS[2]  job record              cg:{acct:<id>}:job:<job id>
-- ARGV     none
--
-- Reply, first the number of outbox events appended (a renewal's), then the outcome:
--   { events, "found", status, operation, cost, attempts, created_at, updated_at,
--     result_status | nil, result_headers JSON | nil, result_body | nil, error | nil }
--   { events, "none" }   no such job (never queued, another account's, or expired)
--   { 0, "noaccount" }
--
-- The record is named from the account, so another account's job id names no record here.
-- Renews first, like every step (memory.rs `job`); the only write is a due renewal.

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end
local events = save_if_renewed(a)

local j = redis.call('HMGET', KEYS[2], 'status', 'operation', 'cost', 'attempts', 'created_at', 'updated_at',
  'result_status', 'result_headers', 'result_body', 'error')
if not j[1] then return { events, 'none' } end
return { events, 'found', j[1], j[2], tonumber(j[3]), tonumber(j[4]), tonumber(j[5]), tonumber(j[6]),
  j[7] and tonumber(j[7]), j[8], j[9], j[10] }
