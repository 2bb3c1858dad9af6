-- topup.lua: adds top-up credits, once per payment reference.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- KEYS[2]  top-up record           cg:{acct:<id>}:topup:<payment ref>
-- ARGV[1]  payment reference
-- ARGV[2]  credits
-- ARGV[3]  "1" when bought as a package, else "0"
-- ARGV[4]  package name (ignored when ARGV[3] is "0")
--
-- Reply:
--   { "created" | "duplicate", payment_ref, credits, package | nil, topup_remaining, created_at }
--     ("duplicate": the original receipt; nothing added)
--   { "noaccount" }

local a = load_account(KEYS[1])
if not a then return { 'noaccount' } end

-- Reads and checks.
local r = redis.call('HMGET', KEYS[2], 'credits', 'package', 'topup_remaining', 'created_at')
if r[1] then
  save_if_renewed(KEYS[1], a)
  return { 'duplicate', ARGV[1], tonumber(r[1]), r[2], tonumber(r[3]), tonumber(r[4]) }
end

-- Writes.
local credits = tonumber(ARGV[2])
a.topup = a.topup + credits
save(KEYS[1], a)
redis.call('HSET', KEYS[2], 'credits', n(credits), 'topup_remaining', n(a.topup), 'created_at', n(a.now))
local package = false
if ARGV[3] == '1' then
  package = ARGV[4]
  redis.call('HSET', KEYS[2], 'package', package)
end
return { 'created', ARGV[1], credits, package, a.topup, a.now }
