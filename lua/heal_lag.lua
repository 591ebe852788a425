--[[
  Sets right the lag Redis reports for a consumer group, when the entries it has not read are
  few enough to count. Redis before 7.2.4 can restore a group's entries-read wrong after a
  restart from its AOF, a clean shutdown included (a soak probe: the inbox's lag 10,103 for
  good, every group read to the end), and Redis 7.0 counts entries a producer's MAXLEN
  trimmed before the group read them as unread for good (a producer probe: the inbox "unread"
  in `status` while ingress kept up). The lag gauges then read too high, `status` says
  entries are unread, and KEDA's redis triggers keep a pool at its maximum. The entries after
  the group's last-delivered-id are its unread ones: at most ARGV[2] of them are counted
  (none when it is the stream's last-generated-id), and its entries-read set to the stream's
  entries-added less them, with XGROUP SETID to its own last-delivered-id (the group does not
  move; atomic, so no entry comes in between). More than ARGV[2] unread: left as it is.

  Input:
    KEYS[1]  a stream
    ARGV[1]  its consumer group
    ARGV[2]  the most unread entries counted (default 1000)

  Output:
    {0, 1, lag}  Redis said `lag` entries were unread (false: it could not tell) and another
                 number is: set
    {0, 0, 0}    nothing to set (a lag of 0 or right, too many unread, no stream or group)
    {-4, 0}      bad ARGV; nothing written
    an error reply  XINFO or XGROUP refused (e.g. NOPERM: the role lacks xgroup|setid)

  Writes: XGROUP SETID ... ENTRIESREAD (the group's counter); nothing else.
]]
local rcall = redis.call
local stream, group = KEYS[1], ARGV[1]
local most = tonumber(ARGV[2] or '1000')
if not group or group == '' or not most or most < 0 then return { -4, 0 } end

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
if not delivered or lag == 0 then return { 0, 0, 0 } end

local info = rcall('XINFO', 'STREAM', stream)
local generated, added
for i = 1, #info, 2 do
  if info[i] == 'last-generated-id' then generated = info[i + 1]
  elseif info[i] == 'entries-added' then added = info[i + 1] end
end
if not generated or not added then return { 0, 0, 0 } end
local unread = 0
if generated ~= delivered then
  unread = #rcall('XRANGE', stream, '(' .. delivered, '+', 'COUNT', most + 1)
  if unread > most then return { 0, 0, 0 } end
end
if lag == unread then return { 0, 0, 0 } end
rcall('XGROUP', 'SETID', stream, group, delivered, 'ENTRIESREAD', added - unread)
return { 0, 1, lag or -1 }
