--[[
  Handles expired leases and old records. A RUNNING run whose lease expired is retried (attempt
  + 1, same sequence, same slot, a new assignment) while attempts remain, else it FAILS and its
  slot is refilled. A CANCELLING run whose lease expired ends CANCELLED. An ASSIGNED run that no
  executor claimed within the assignment deadline gets a fresh assignment entry (same attempt;
  its entry may be gone, or held by an executor that cannot claim it), then again after twice,
  four times ... up to 64 times the deadline, so its slot is never held by a run nobody can
  claim; a duplicate entry is refused by claim. Records of runs that ended more than the
  retention ago are deleted, and so is the memory of the newest runs of groups that admitted
  nothing for as long.

  Input:
    KEYS[1..10] the shard state keys, as in admit.lua
    KEYS[11]    newest hash      as in admit.lua
    KEYS[12]    newest-at zset   as in admit.lua
    ARGV[1]     now in ms, or 0 for the server clock
    ARGV[2]     at most this many leases and this many old records per call
    ARGV[3]     retention of ended runs in ms
    ARGV[4]     assignment deadline in ms

  Output:
    {0, retried, failed, cancelled, expired records, assigned, reassigned}
    {-4, 0}  bad ARGV; nothing written

  Writes: XADD <prefix>:<workflow tag> for retries and for runs started in released slots.
]]
local rcall = redis.call
local runsKey, queueKey, activeKey, slotsKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local leasesKey, terminalKey, assignKey, controlKey = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local inputsKey, countsKey = KEYS[9], KEYS[10]
local newestKey, newestAtKey = KEYS[11], KEYS[12]

-- @include now
-- @include runs

local now = nowMs(ARGV[1])
local limit, retention, deadline = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if not limit or limit < 1 or not retention or not deadline or deadline <= 0 then
  return { -4, 0 }
end

-- @include transitions

local retried, failed, cancelled, reassigned = 0, 0, 0, 0
local expired = rcall('ZRANGEBYSCORE', leasesKey, '-inf', now, 'LIMIT', 0, limit)
for i = 1, #expired do
  local rid = expired[i]
  rcall('ZREM', leasesKey, rid)
  local rec = loadRun(rid)
  if rec and rec.st == 'R' then
    if rec.a < rec.m then
      rec.a = rec.a + 1
      assignRun(rid, rec)
      retried = retried + 1
    else
      rcall('ZREM', activeKey, memberOf(rid, rec))
      addSlots(rec.g, -1)
      touch(rec)
      endRun(rid, rec, 'F', 'lease_expired')
      failed = failed + 1
    end
  elseif rec and rec.st == 'A' then
    local ra = rec.ra or 0
    local due = (rec.tr or rec.t1) + deadline * 2 ^ math.min(ra, 6)
    if now >= due then
      writeAssignment(rid, rec)
      rec.ra = ra + 1
      rec.tr = now
      saveRun(rid, rec)
      due = now + deadline * 2 ^ math.min(ra + 1, 6)
      reassigned = reassigned + 1
    end
    rcall('ZADD', leasesKey, due, rid)
  elseif rec and rec.st == 'X' then
    if rec.h == 1 then addSlots(rec.g, -1); touch(rec) end
    endRun(rid, rec, 'C')
    cancelled = cancelled + 1
  end
end

refillTouched()
flushRuns()
flushNewest()

local old = rcall('ZRANGEBYSCORE', terminalKey, '-inf', now - retention, 'LIMIT', 0, limit)
if #old > 0 then
  local raws = rcall('HMGET', runsKey, unpack(old))
  for i = 1, #raws do
    if raws[i] then
      local rec = cmsgpack.unpack(raws[i])
      if rec.c == 1 then countRun(rec.w, rec.st, -1) end
    end
  end
  flushCounts()
  rcall('HDEL', runsKey, unpack(old))
  rcall('HDEL', inputsKey, unpack(old))
  rcall('ZREM', terminalKey, unpack(old))
end
local idle = rcall('ZRANGEBYSCORE', newestAtKey, '-inf', now - retention, 'LIMIT', 0, limit)
if #idle > 0 then
  rcall('HDEL', newestKey, unpack(idle))
  rcall('ZREM', newestAtKey, unpack(idle))
end
return { 0, retried, failed, cancelled, #old, stats.assigned, reassigned }
