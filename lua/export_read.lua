-- export_read.lua: the oldest history entries not yet exported (usage export).
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV[1]  at most this many
--
-- Reply: { events appended (a renewal's), "found", entry JSON... } or { 0, "noaccount" }
--
-- The account's `exp` field is the last exported seq; entries after it are never trimmed while
-- export is on (lib.lua `save`), so they are all still in cg:{acct:<id>}:history, at index
-- seq - 1 - hphys (lib.lua `load_account`). An export switched on after entries were trimmed starts at the oldest kept.
-- Same steps as memory.rs `unexported`.

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end
local events = save_if_renewed(a)

local first = math.max(a.exported, a.htrim) + 1
local last = math.min(a.hist, first + tonumber(ARGV[1]) - 1)
local reply = { events, 'found' }
if last >= first then
  for _, e in ipairs(redis.call('LRANGE', sub_key(a, 'history'), first - 1 - a.hphys, last - 1 - a.hphys)) do
    reply[#reply + 1] = entry_json(e)
  end
end
return reply
