-- update_account.lua: changes the plan (upgrade now, downgrade at the next renewal) and/or the
-- e-mail.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV[1]  "1" when a plan change is given, else "0"
-- ARGV[2]  new plan (ignored when ARGV[1] is "0")
-- ARGV[3]  its allocation (ignored when ARGV[1] is "0")
-- ARGV[4]  "1" when an e-mail is given, else "0"
-- ARGV[5]  e-mail (ignored when ARGV[4] is "0")
--
-- Reply:
--   { events appended (a renewal's), "upgraded" | "downgrade_scheduled" | "unchanged" }
--   { 0, "noaccount" }
--
-- Same rules as memory.rs `Account::change_plan`: the same plan cancels a pending downgrade
-- (no history entry); a lower allocation becomes `pending_plan` (a `plan_change` entry with no
-- balance change); otherwise (higher or equal allocation, other plan) the plan applies now, the
-- monthly bucket grows by the difference and a pending downgrade is dropped.

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end

-- The step, in memory (nothing to check).
local outcome = 'unchanged'
if ARGV[1] == '1' then
  local plan, allocation = ARGV[2], tonumber(ARGV[3])
  if plan == a.plan then
    if a.pending_plan then
      a.pending_plan = false
      a.pending_changed = true
    end
  elseif allocation < a.allocation then
    a.pending_plan, a.pending_allocation = plan, allocation
    a.pending_changed = true
    add_entry(a, 'plan_change', 0, 0, { plan = plan })
    outcome = 'downgrade_scheduled'
  else
    local grow = allocation - a.allocation
    a.plan, a.allocation = plan, allocation
    if a.pending_plan then
      a.pending_plan = false
      a.pending_changed = true
    end
    a.monthly = a.monthly + grow
    add_entry(a, 'plan_change', grow, 0, { plan = plan })
    outcome = 'upgraded'
  end
end

-- Writes (none for a request that changes nothing, unless a renewal is due).
local events
if a.pending_changed or #a.entries > 0 then events = save(a) else events = save_if_renewed(a) end
if ARGV[4] == '1' then redis.call('HSET', KEYS[1], 'email', ARGV[5]) end
return { events, outcome }
