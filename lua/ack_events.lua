-- ack_events.lua: removes delivered (or expired) events from an account's outbox.
--
-- KEYS[1]  account hash            cg:{acct:<id>}
-- ARGV     the event ids
--
-- Reply: { events appended (a renewal's), "acked", outbox length after } or { 0, "noaccount" }
--
-- Events are delivered oldest first, so the ids acknowledged are normally the head of the list
-- cg:{acct:<id>}:outbox (named from KEYS[1]): those are dropped with one LTRIM after reading
-- only as many elements as there are ids. Only when the head holds an event not acknowledged
-- (acknowledgements out of order) is the whole list read and rewritten without them. Renews
-- first, like every step; nothing here can refuse, so the renewal's write may come before the
-- reads.

local a = load_account(KEYS[1])
if not a then return { 0, 'noaccount' } end
local events = save_if_renewed(a)

local outbox = sub_key(a, 'outbox')
local wanted, count = {}, 0
for _, id in ipairs(ARGV) do
  if not wanted[id] then
    wanted[id] = true
    count = count + 1
  end
end
local function acked(e)
  local ok, event = pcall(cjson.decode, e)
  return ok and type(event) == 'table' and wanted[event.id] == true
end

if count > 0 then
  local head = redis.call('LRANGE', outbox, 0, count - 1)
  local in_order = true
  for _, e in ipairs(head) do
    if not acked(e) then
      in_order = false
      break
    end
  end
  if in_order then
    redis.call('LTRIM', outbox, #head, -1)
  else
    local all = redis.call('LRANGE', outbox, 0, -1)
    local keep = {}
    for _, e in ipairs(all) do
      if not acked(e) then keep[#keep + 1] = e end
    end
    if #keep < #all then
      redis.call('DEL', outbox)
      -- In chunks: unpack and a command's arguments are limited to a few thousand at once.
      for i = 1, #keep, 1000 do
        redis.call('RPUSH', outbox, unpack(keep, i, math.min(i + 999, #keep)))
      end
    end
  end
end
return { events, 'acked', redis.call('LLEN', outbox) }
