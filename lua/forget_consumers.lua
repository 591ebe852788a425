--[[
  Deletes the consumers of one consumer group that hold no pending entry and have been idle for
  at least the given time: those of processes that are gone. Every process reads under a name
  of its own (supersede.streams.consumer_name), so each restart and each rolling deploy leaves
  one consumer per process in every group it read, about 300 bytes each, forever. Atomic: a
  consumer with nothing pending at this instant loses nothing by its deletion (XGROUP
  DELCONSUMER drops only its pending entries, and it has none), and a live one that merely sat
  idle is created anew by its next read.

  Input:
    KEYS[1]  a stream
    ARGV[1]  its consumer group
    ARGV[2]  idle ms: a consumer idle for less is kept (XINFO CONSUMERS' `idle`: since its last
             read or claim)
    ARGV[3]  at most this many consumers deleted per call

  Output:
    {0, deleted, kept}  kept: consumers left in the group
    {0, 0, 0}           the stream or the group does not exist; nothing written
    {-4, 0}             bad ARGV; nothing written
    an error reply      XINFO failed otherwise (e.g. NOPERM); nothing written

  Writes: XGROUP DELCONSUMER; nothing else.
]]
local rcall = redis.call
local stream, group = KEYS[1], ARGV[1]
local idleMs, most = tonumber(ARGV[2]), tonumber(ARGV[3])
if not group or group == '' or not idleMs or idleMs < 0 or not most or most < 0 then
  return { -4, 0 }
end

local consumers = redis.pcall('XINFO', 'CONSUMERS', stream, group)
if type(consumers) == 'table' and consumers.err then
  -- (a missing stream or group has no consumers; any other error, e.g. a refused command,
  -- is the caller's to see)
  local err = consumers.err
  if string.find(err, 'NOGROUP', 1, true) or string.find(err, 'no such key', 1, true) then
    return { 0, 0, 0 }
  end
  return consumers
end

local deleted = 0
for i = 1, #consumers do
  local c = consumers[i]
  local name, pending, idle
  for k = 1, #c, 2 do
    if c[k] == 'name' then name = c[k + 1]
    elseif c[k] == 'pending' then pending = c[k + 1]
    elseif c[k] == 'idle' then idle = c[k + 1] end
  end
  if deleted < most and name and pending == 0 and idle and idle >= idleMs then
    rcall('XGROUP', 'DELCONSUMER', stream, group, name)
    deleted = deleted + 1
  end
end
return { 0, deleted, #consumers - deleted }
