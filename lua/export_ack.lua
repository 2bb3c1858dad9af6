-- export_ack.lua: records that the history up to a seq was exported.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV[1]  the last exported seq
--
-- Reply: { events appended (a renewal's), "acked", entries left to export } or { 0, "noaccount" }
--
-- The mark (`exp`) only moves forward and never past the newest entry, so a late or repeated
-- acknowledgement changes nothing. Entries up to it may now be trimmed (lib.lua `save`, at the
-- next append). Same steps as memory.rs `ack_export`.

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end
local events = save_if_renewed(a)

local mark = math.max(a.exported, math.min(tonumber(ARGV[1]), a.hist))
if mark ~= a.exported then redis.call('HSET', KEYS[1], 'exp', n(mark)) end
return { events, 'acked', a.hist - mark }
