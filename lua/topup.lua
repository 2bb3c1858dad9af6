-- topup.lua: adds top-up credits, once per payment reference.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- KEYS[2]  top-up record           cg:{acct:<id>}:topup:<payment ref>
-- ARGV[1]  payment reference
-- ARGV[2]  credits
-- ARGV[3]  "1" when bought as a package, else "0"
-- ARGV[4]  package name (ignored when ARGV[3] is "0")
--
-- Reply, first the number of outbox events appended, then the outcome:
--   { events, "created" | "duplicate", payment_ref, credits, package | nil, topup_remaining, created_at }
--     ("duplicate": the original receipt; nothing added)
--   { 0, "noaccount" }
--
-- A new top-up writes a `topup` history entry and a `topup.completed` event (memory.rs
-- `Account::topup`).

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end

-- Reads and checks.
local r = redis.call('HMGET', KEYS[2], 'credits', 'package', 'topup_remaining', 'created_at')
if r[1] then
  return { save_if_renewed(a), 'duplicate', ARGV[1], tonumber(r[1]), r[2], tonumber(r[3]), tonumber(r[4]) }
end

-- The step, in memory.
local credits = tonumber(ARGV[2])
local package = false
if ARGV[3] == '1' then package = ARGV[4] end
a.topup = a.topup + credits
add_entry(a, 'topup', 0, credits, { payment_ref = ARGV[1], package = package })
add_event(a, 'topup.completed', json_object('payment_ref', ARGV[1], 'credits', credits,
  'package', package or JSON_NULL, 'topup_remaining', a.topup))

-- Writes.
local events = save(a)
redis.call('HSET', KEYS[2], 'credits', n(credits), 'topup_remaining', n(a.topup), 'created_at', n(a.now))
if package then redis.call('HSET', KEYS[2], 'package', package) end
return { events, 'created', ARGV[1], credits, package, a.topup, a.now }
