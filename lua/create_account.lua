-- create_account.lua: creates an account; nothing happens when the id exists already.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV[1]  plan
-- ARGV[2]  allocation (monthly credits)
-- ARGV[3]  billing anchor, Unix seconds
-- ARGV[4]  "1" when an e-mail is given, else "0"
-- ARGV[5]  e-mail (ignored when ARGV[4] is "0")
--
-- Reply: 1 created, 0 the account exists.

if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end

local allocation = tonumber(ARGV[2])
local anchor = tonumber(ARGV[3])
local now = clock(nil)
-- An anchor in the future puts "now" in period -1, which ends at the anchor.
local period = period_at(anchor_from_unix(anchor), now)

redis.call('HSET', KEYS[1], 'plan', ARGV[1], 'allocation', n(allocation), 'anchor', n(anchor),
  'period', n(period), 'monthly', n(allocation), 'topup', '0', 'used', '0', 'now', n(now),
  'created_at', n(now))
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'email', ARGV[5]) end
return 1
