-- account.lua: the account as of now, renewing it first if a period boundary has passed.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV     none
--
-- Reply: nil when there is no such account, else
--   { plan, allocation, pending_plan | nil, monthly_remaining, topup_remaining,
--     used_this_period, period_start, renews_at, email | nil }
-- Writes only when a renewal is due, so a plain read costs no AOF append.

local a = load_account(KEYS[1])
if not a then return false end
save_if_renewed(KEYS[1], a)
return { a.plan, a.allocation, a.pending_plan, a.monthly, a.topup, a.used,
  period_start(a.anchor, a.period), renews_at(a), a.email }
