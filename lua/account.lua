-- account.lua: the account as of now, renewing it first if a period boundary has passed.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV     none
--
-- Reply: { 0, "noaccount" } when there is no such account, else
--   { events appended, "found", plan, allocation, pending_plan | nil, monthly_remaining,
--     topup_remaining, used_this_period, period_start, renews_at, email | nil,
--     auto_package | nil (nil: no auto top-up setting was ever made), auto_enabled "1"/"0",
--     auto_threshold, auto_credits, auto_price (Rust f64 text), auto_topups_this_period }
-- Writes only when a renewal is due, so a plain read costs no AOF append.

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end
local events = save_if_renewed(a)
local auto = a.auto or {}
local enabled = '0'
if auto.enabled then enabled = '1' end
return { events, 'found', a.plan, a.allocation, a.pending_plan, a.monthly, a.topup, a.used,
  period_start(a.anchor or anchor_from_unix(a.anchor_unix), a.period), renews_at(a), a.email, auto.package or false, enabled,
  auto.threshold or 0, auto.credits or 0, auto.price or '0', a.auto_count }
