--[[
  Ingress's take-over of inbox entries another ingress process read and never acknowledged
  (XAUTOCLAIM), each entry larger than ingress takes returned cut, never whole. Anyone may XADD
  to the inbox: an entry of 250 MB took the ingress process that read it to 3 or 4 times that,
  past its memory limit (killed, it wrote no dead letter), and each process that took it over
  30 s later was killed the same way, for good: intake stopped (a security probe). Here such an
  entry comes back as its first fields, each value cut, with its true size, so ingress writes
  its `too_large` dead letter from what it holds. Entries are claimed one a call (a page of
  them at once would hold them all in the server's Lua memory). This consumer's own pending
  entries (idle since a little less than the take-over's idle time) are claimed and left out:
  they are the process's own to read again (see Service.take_over).

  Input:
    KEYS[1]  the inbox stream
    ARGV[1]  ingress's consumer group
    ARGV[2]  this consumer
    ARGV[3]  min idle ms (XAUTOCLAIM's)
    ARGV[4]  start id
    ARGV[5]  at most this many XAUTOCLAIM calls, of one entry each
    ARGV[6]  the largest entry returned whole: bytes of its names and values
    ARGV[7]  bytes of each value kept of a larger entry (names longer than this are left out)
    ARGV[8]  fields kept of a larger entry
    ARGV[9]  this consumer's own pending entries listed beyond ARGV[5]

  Output:
    {0, next start id, entries, deleted ids, cut}
      entries  {id, {name, value, ...}} as XAUTOCLAIM gives them, less this consumer's own
      deleted  ids of pending entries no longer in the stream (Redis 7; {} before)
      cut      {id, bytes, fields} for each entry of `entries` returned cut: its true size
    {-4, 0}  bad ARGV; nothing written

  Writes: XAUTOCLAIM (the claimed entries' owner, idle time and delivery count); nothing else.
]]
local rcall = redis.call
local stream = KEYS[1]
local group, consumer, start = ARGV[1], ARGV[2], ARGV[4]
local minIdle, count = tonumber(ARGV[3]), tonumber(ARGV[5])
local largest, keepBytes, keepFields = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local ownListed = tonumber(ARGV[9])
if not group or group == '' or not consumer or consumer == '' or not minIdle or minIdle < 0
  or not count or count < 1 or not largest or not keepBytes or not keepFields
  or not ownListed then
  return { -4, 0 }
end

local margin = math.min(1000, math.floor(minIdle / 2))
local mine = {}
local own = rcall('XPENDING', stream, group, 'IDLE', math.max(0, minIdle - margin), start, '+',
  count + ownListed, consumer)
for i = 1, #own do mine[own[i][1]] = true end

local entries, cut, deleted = {}, {}, {}
local cursor = start
-- One entry a call (COUNT 1): a page of them would hold every one in the server's Lua memory at
-- once, and XRANGE is not among ingress's rights.
for _ = 1, count do
  local claimed = rcall('XAUTOCLAIM', stream, group, consumer, minIdle, cursor, 'COUNT', 1)
  cursor = claimed[1]
  for _, id in ipairs(claimed[3] or {}) do deleted[#deleted + 1] = id end
  local entry = claimed[2][1]
  if type(entry) == 'table' and entry[2] and not mine[entry[1]] then  -- (6.2: deleted = nil)
    local fields = entry[2]
    local size = 0
    for i = 1, #fields do size = size + #fields[i] end
    if size > largest then
      local kept = {}
      for i = 1, #fields, 2 do
        if #kept >= 2 * keepFields then break end
        if #fields[i] <= keepBytes then
          kept[#kept + 1] = fields[i]
          kept[#kept + 1] = string.sub(fields[i + 1], 1, keepBytes)
        end
      end
      entries[#entries + 1] = { entry[1], kept }
      cut[#cut + 1] = { entry[1], size, #fields / 2 }
      entry, fields, claimed = nil, nil, nil
      collectgarbage('collect')  -- (the entry's copy, before the next one is read)
    else
      entries[#entries + 1] = entry
    end
  end
  if cursor == '0-0' then break end
end
return { 0, cursor, entries, deleted, cut }
