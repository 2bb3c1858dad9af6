-- billing.lua: an account's payment details (`[billing.stripe]`), kept on the account hash.
-- Never a balance: the customer id, the card charged for auto top-ups, and whether the last
-- auto top-up payment failed.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV[1]  "read", "customer" (keep the customer id unless one is kept) or "card" (keep the
--          card, clear the failure mark)
-- ARGV[2]  the customer id or card (not with "read")
--
-- Reply: { 0, "noaccount" } or { 0, "billing", customer | nil, card | nil, "1" | nil (failed) }
-- (memory.rs `MemoryLedger::billing`, `set_billing_customer`, `set_billing_card`)

if redis.call('EXISTS', KEYS[1]) == 0 then return { 0, 'noaccount' } end
if ARGV[1] == 'customer' then
  redis.call('HSETNX', KEYS[1], 'bill_customer', ARGV[2])
elseif ARGV[1] == 'card' then
  redis.call('HSET', KEYS[1], 'bill_card', ARGV[2])
  redis.call('HDEL', KEYS[1], 'bill_failed')
end
local v = redis.call('HMGET', KEYS[1], 'bill_customer', 'bill_card', 'bill_failed')
return { 0, 'billing', v[1], v[2], v[3] }
