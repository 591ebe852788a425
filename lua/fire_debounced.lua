--[[
  Fires the debounce timers that are due: the waiting run of each due group arrives at its
  group now, under the group's strategy, as a run without debounce would have on admission
  (it may start, queue, or supersede older runs), and is named the group's last (an older
  event that arrives later ends at once). A waiting run cancelled meanwhile (by hand) is
  skipped. Admission calls it when the earliest timer it set is due, and every second for
  the timers other processes set (or a restart left).

  Input:
    KEYS[1..10] the shard state keys, as in admit.lua
    KEYS[11]    newest hash      as in admit.lua
    KEYS[12]    newest-at zset   as in admit.lua
    KEYS[13]    debounce hash    as in admit.lua
    KEYS[14]    due zset         as in admit.lua
    KEYS[15]    fences hash      as in admit.lua: '<group id>|last' -> '<seq>|<run id>', the
                                 run each window fired let through (unless its strategy
                                 ended it at once)
    ARGV[1]     now in ms, or 0 for the server clock
    ARGV[2]     at most this many groups per call
    ARGV[3]     assignment deadline in ms, as in admit.lua

  Output:
    {0, fired, next due ms (0: none), assigned, cancelled, gone (runs whose records or members
     were gone: their members dropped, their slots freed)}
    {-4, 0}  bad ARGV; nothing written

  Writes: XADD <prefix>:<workflow tag> for runs it starts; XADD control for runs it cancels;
  XADD <ended>:<workflow tag> for runs that end.
  Each assignment stream written rings its bell once a call: SPUBLISH <its name> ''; its
  entries then carry r = '1' (read without it, executors keep their blocking reads).
]]
local rcall = redis.call
local runsKey, queueKey, activeKey, slotsKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local leasesKey, endedKey, assignKey, controlKey = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local inputsKey, countsKey = KEYS[9], KEYS[10]
local newestKey, newestAtKey, debounceKey, dueKey = KEYS[11], KEYS[12], KEYS[13], KEYS[14]
local fencesKey = KEYS[15]

-- @include now
-- @include runs

local now, nowUs = nowMs(ARGV[1])
local limit, assignDeadlineMs = tonumber(ARGV[2]), tonumber(ARGV[3])
if not limit or limit < 1 or not assignDeadlineMs then return { -4, 0 } end

-- @include transitions

local fired = 0
local groups = rcall('ZRANGEBYSCORE', dueKey, '-inf', now, 'LIMIT', 0, limit)
if #groups > 0 then
  local cur = rcall('HMGET', debounceKey, unpack(groups))
  rcall('HDEL', debounceKey, unpack(groups))
  rcall('ZREM', dueKey, unpack(groups))
  local waiting = {}
  for i = 1, #groups do
    if cur[i] then
      local m = string.sub(cur[i], string.find(cur[i], '|', 1, true) + 1)
      waiting[#waiting + 1] = ridOf(m)
    end
  end
  prefetchRuns(waiting)
  prefetchSlots(groups)
  prefetchNewest(groups)
  local closed = {}   -- group -> the member its window let through
  for i = 1, #groups do
    if cur[i] then
      local g = groups[i]
      local m = string.sub(cur[i], string.find(cur[i], '|', 1, true) + 1)
      local rec = loadRun(ridOf(m))
      if rec and rec.st == 'Q' then
        applyArrivals(g, rec, { m })
        fired = fired + 1
        if rec.st ~= 'C' then   -- (one its strategy turned away, CANCEL_NEWEST's, is none)
          closed[#closed + 1] = g .. '|last'
          closed[#closed + 1] = string.sub(m, #g + 2)   -- '<seq>|<rid>' (a short value)
        end
      end
    end
  end
  callChunked('HSET', fencesKey, closed, 1000)
  flushRuns()
  flushNewest()
end
local head = rcall('ZRANGE', dueKey, 0, 0, 'WITHSCORES')
return { 0, fired, tonumber(head[2] or 0), stats.assigned, stats.cancelled, ghosts }
