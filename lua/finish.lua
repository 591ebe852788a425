--[[
  Records a batch of outcomes reported by executors, releases the slots they held and fills
  them from the queue. A result for another attempt, or for a run that already ended, changes
  nothing (duplicate or late delivery). A CANCELLING run ends CANCELLED whatever it reports:
  results of cancelled runs are discarded.

  Input:
    KEYS[1..10] the shard state keys, as in admit.lua
    KEYS[11]    results stream (XACKed)
    KEYS[12]    newest hash      as in admit.lua (an ended CANCEL_IN_PROGRESS run is remembered)
    KEYS[13]    newest-at zset   as in admit.lua
    KEYS[14]    outputs hash     run id -> msgpack step outputs (of runs that ended S or F)
    ARGV[1]     now in ms, or 0 for the server clock
    ARGV[2]     consumer group of the results stream
    ARGV[3..]   pairs: results entry id, msgpack result {id, a, o = 'S'|'F'|'C', err, out, hs}
                (hs: when the handler started, ms, executor's clock; optional)

  Output:
    {0, applied, stale, assigned}
    {-1, i, field}  result i is malformed; nothing written
    {-2, i}         result i names a run that does not exist; nothing written
    {-4, 0}         bad ARGV; nothing written

  Writes: XADD <ended>:<workflow tag> {<state> = run ids}; XADD <prefix>:<workflow tag> for
  runs started in the released slots.
]]
local rcall = redis.call
local runsKey, queueKey, activeKey, slotsKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local leasesKey, endedKey, assignKey, controlKey = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local inputsKey, countsKey, resultsKey = KEYS[9], KEYS[10], KEYS[11]
local newestKey, newestAtKey, outputsKey = KEYS[12], KEYS[13], KEYS[14]

-- @include now
-- @include runs
-- @include ack

local now = nowMs(ARGV[1])
local groupName = ARGV[2]
if not groupName or (#ARGV - 2) % 2 ~= 0 then return { -4, 0 } end

-- @include transitions

local OUTCOMES = { S = true, F = true, C = true }
local results = {}
for i = 3, #ARGV, 2 do
  local n = (i - 1) / 2
  local ok, r = pcall(cmsgpack.unpack, ARGV[i + 1])
  if not ok or type(r) ~= 'table' then return { -1, n, 'payload' } end
  if type(r.id) ~= 'string' or r.id == '' then return { -1, n, 'id' } end
  if type(r.a) ~= 'number' then return { -1, n, 'a' } end
  if not OUTCOMES[r.o] then return { -1, n, 'o' } end
  if r.err ~= nil and type(r.err) ~= 'string' then return { -1, n, 'err' } end
  if r.out ~= nil and type(r.out) ~= 'string' then return { -1, n, 'out' } end
  if r.hs ~= nil and type(r.hs) ~= 'number' then return { -1, n, 'hs' } end
  if not loadRun(r.id) then return { -2, n } end
  results[n] = r
end

local applied, stale = 0, 0
local outputs = {}   -- run id, outputs, ... of runs that ended here SUCCEEDED or FAILED
for n = 1, #results do
  local r = results[n]
  local rec = loadRun(r.id)
  if rec.a ~= r.a then
    stale = stale + 1
  elseif rec.st == 'R' then
    rcall('ZREM', activeKey, memberOf(r.id, rec))
    rcall('ZREM', leasesKey, r.id)
    addSlots(rec.g, -1)
    touch(rec)
    if r.err then rec.err = r.err end
    hopAfterInbox(rec, 'hs', r.hs)
    endRun(r.id, rec, r.o, r.o == 'C' and 'executor' or nil)
    if r.out and r.o ~= 'C' then outputs[#outputs + 1] = r.id; outputs[#outputs + 1] = r.out end
    applied = applied + 1
  elseif rec.st == 'X' then
    rcall('ZREM', leasesKey, r.id)
    if rec.h == 1 then addSlots(rec.g, -1); touch(rec) end
    endRun(r.id, rec, 'C')
    applied = applied + 1
  else
    stale = stale + 1
  end
end

refillTouched()
callChunked('HSET', outputsKey, outputs, 1000)
ackEntries(resultsKey, groupName, 3, 2)
flushRuns()
flushNewest()
return { 0, applied, stale, stats.assigned }
