--[[
  Sets right the lag Redis reports for a consumer group that has read its stream to the end.
  Redis before 7.2.4 can restore a group's entries-read wrong after a restart from its AOF, a
  clean shutdown included (a soak probe: the inbox's lag 10,103 for good, every group read to
  the end): the lag gauges then read about each stream's length, `status` says entries are
  unread, and KEDA's redis triggers keep a pool at its maximum. When the group's
  last-delivered-id is the stream's last-generated-id, nothing is unread: its entries-read is
  then the stream's entries-added, set with XGROUP SETID to the group's own last-delivered-id
  (the group does not move; atomic, so no entry comes in between).

  Input:
    KEYS[1]  a stream
    ARGV[1]  its consumer group

  Output:
    {0, 1, lag}  the group had read to the end and Redis said `lag` entries were unread: set
    {0, 0, 0}    nothing to set (a lag of 0 or unknown, entries unread, no stream or group)
    {-4, 0}      bad ARGV; nothing written
    an error reply  XINFO or XGROUP refused (e.g. NOPERM: the role lacks xgroup|setid)

  Writes: XGROUP SETID ... ENTRIESREAD (the group's counter); nothing else.
]]
local rcall = redis.call
local stream, group = KEYS[1], ARGV[1]
if not group or group == '' then return { -4, 0 } end

local groups = redis.pcall('XINFO', 'GROUPS', stream)
if type(groups) == 'table' and groups.err then
  if string.find(groups.err, 'no such key', 1, true) then return { 0, 0, 0 } end
  return groups
end
local delivered, lag
for _, g in ipairs(groups) do
  local fields = {}
  for i = 1, #g, 2 do fields[g[i]] = g[i + 1] end
  if fields['name'] == group then delivered, lag = fields['last-delivered-id'], fields['lag'] end
end
if not delivered or not lag or lag == 0 then return { 0, 0, 0 } end

local info = rcall('XINFO', 'STREAM', stream)
local generated, added
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then generated = info[i + 1]
  elseif info[i] == 'entries-added' then added = info[i + 1] end
end
if not generated or not added or generated ~= delivered then return { 0, 0, 0 } end
rcall('XGROUP', 'SETID', stream, group, delivered, 'ENTRIESREAD', added)
return { 0, 1, lag }
