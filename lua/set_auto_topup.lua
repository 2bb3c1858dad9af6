-- set_auto_topup.lua: stores the account's auto top-up setting.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV[1]  "1" enabled, "0" disabled
-- ARGV[2]  threshold (buy when a charge takes the total remaining below it)
-- ARGV[3]  package name
-- ARGV[4]  credits of the package
-- ARGV[5]  price in euros, as Rust writes the f64 (read back exactly for the account view)
-- ARGV[6]  the same price as JSON (inserted as is into `auto_topup.purchased` events)
--
-- Reply: { events appended (a renewal's), "set" } or { 0, "noaccount" }

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end

-- Switching it on (from off or from no setting) arms it: if the balance is already below the
-- threshold, the next charge buys. Saving an enabled setting again leaves the arming as it is,
-- so repeated saves below the threshold cannot buy again; switching it off disarms.
local armed = a.auto and a.auto.armed and '1' or '0'
if ARGV[1] == '1' and not (a.auto and a.auto.enabled) then armed = '1' end
if ARGV[1] ~= '1' then armed = '0' end

-- Writes.
a.auto_enabled = ARGV[1] == '1'
local events = save(a)
redis.call('HSET', KEYS[1], 'auto_threshold', ARGV[2], 'auto_package', ARGV[3],
  'auto_credits', ARGV[4], 'auto_price', ARGV[5], 'auto_price_json', ARGV[6], 'auto_armed', armed)
return { events, 'set' }
