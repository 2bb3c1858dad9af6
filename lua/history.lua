-- history.lua: history entries, newest first.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV[1]  only entries with seq below this ("" for all)
-- ARGV[2]  at most this many
--
-- Reply: { events appended (a renewal's), "found", entry JSON... } or { 0, "noaccount" }
--
-- Entry seq s sits at index s - 1 - hphys of the list cg:{acct:<id>}:history (named from
-- KEYS[1]): entries are appended with seq from 1 without gaps, and only the oldest are removed
-- (hphys of them, see lib.lua `save`), so a page is one LRANGE, O(limit). Entries up to seq
-- htrim are trimmed as readers see it even while still in the list.
-- The only write is a due renewal (whose entry the page then includes, as in memory.rs); it
-- comes before the LRANGE, which cannot refuse anything.

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end
local events = save_if_renewed(a)

local last = a.hist
if ARGV[1] ~= '' then last = math.min(last, tonumber(ARGV[1]) - 1) end
local first = math.max(last - tonumber(ARGV[2]) + 1, a.htrim + 1)
local reply = { events, 'found' }
if last >= first then
  local page = redis.call('LRANGE', sub_key(a, 'history'), first - 1 - a.hphys, last - 1 - a.hphys)
  for i = #page, 1, -1 do reply[#reply + 1] = entry_json(page[i]) end
end
return reply
