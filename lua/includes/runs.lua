--[[
  Run records, slot counters, leases and end-of-run bookkeeping, cached for the length of one
  script call and written once at its end (each redis.call costs about as much as the Lua
  around it). Needs the locals runsKey, slotsKey, endedKey, inputsKey, countsKey, leasesKey.
  The counts hash holds '<workflow>|<state letter>' -> runs of that workflow in that state,
  kept from the state each record had when this call loaded it and the state it is written
  with; only records marked c = 1 (all created since the counts exist) are counted, so older
  ones never skew them.
  A record is a msgpack map: st state, g group, s sequence, w workflow, v version, k key
  (absent when it equals ev), ev event id, mx max_runs, sg strategy code, sx strict (0/1), sc
  1: a scope's group (it may keep another version's queue),
  a attempt, m max attempts, hb hand-backs by draining executors (hq 1 until the next claim),
  ea how the last earlier attempts ended (transitions.lua's noteEarlier), e executor, h (1: a
  CANCELLING run still holds its slot), ra/tr re-assignments of an unclaimed ASSIGNED attempt
  and the time of the last, ai the id of its last assignment entry (until the claim), t0
  created ms,
  t1 assigned ms, t3 ended ms, tc cancel decided ms, by superseding run id, why reason, err
  error text, c counted, in the run's input while it is live, when it is at most
  INLINE_INPUT_BYTES (a longer one is in the inputs hash: a record is unpacked and packed again
  by every script that changes it); the run's path, each point in µs after the inbox entry's ms (the
  first 16 hex digits of s): pi ingress read, pw request written, pa admission read, pg
  assigned, pe executor read, pc claimed, ph handler started (the last attempt's). Records
  written before the path existed have t2 (claimed ms) and ir/rw/ar/er/hs (hops in ms after
  the inbox entry) instead; claim removes them.
]]
local runCache, runDirty = {}, {}
-- Inputs up to this size live in the run's record while it is live (the inputs hash holds
-- longer ones): an HSET at admission, an HMGET at the claim and an HDEL at the end spared,
-- about 2 µs of server CPU per run (docs/benchmarks.md); past it, each script that changes
-- the record would copy it.
local INLINE_INPUT_BYTES = 1024
local slotCache, slotDirty = {}, {}
local endedBy, endedOrder, endedAt, droppedInputs = {}, {}, 0, {}
local stateOf = {}   -- run id -> its state when this call loaded it
local countDelta, countOrder = {}, {}
local leaseAt, leaseOrder = {}, {}   -- run id -> lease score, or false: leaves the leases zset

-- Sets (score) or removes (false) a run's entry in the leases zset, at flush: the last call for
-- a run wins. (No script reads the leases zset after changing it.)
local function setLease(rid, score)
  if leaseAt[rid] == nil then leaseOrder[#leaseOrder + 1] = rid end
  leaseAt[rid] = score
end

-- Changes the count of runs of one workflow in one state, written at flush. (The field names
-- are made once a call: a string built per run costs about 2% of a run's admission.)
local countField = {}   -- workflow -> state -> '<workflow>|<state>'
local function countRun(workflow, state, delta)
  local byState = countField[workflow]
  if not byState then byState = {}; countField[workflow] = byState end
  local field = byState[state]
  if not field then field = workflow .. '|' .. state; byState[state] = field end
  if countDelta[field] == nil then countOrder[#countOrder + 1] = field; countDelta[field] = 0 end
  countDelta[field] = countDelta[field] + delta
end

local function flushCounts()
  for i = 1, #countOrder do
    local field = countOrder[i]
    if countDelta[field] ~= 0 and rcall('HINCRBY', countsKey, field, countDelta[field]) <= 0 then
      rcall('HDEL', countsKey, field)
    end
  end
  countDelta, countOrder = {}, {}
end

local function loadRun(rid)
  local rec = runCache[rid]
  if rec == nil then
    local raw = rcall('HGET', runsKey, rid)
    rec = raw and cmsgpack.unpack(raw) or false
    runCache[rid] = rec
    if rec then stateOf[rid] = rec.st end
  end
  return rec or nil
end

-- Loads many records with one HMGET (ids may repeat).
local function prefetchRuns(rids)
  for i = 1, #rids, 1000 do
    local last = math.min(i + 999, #rids)
    local raws = rcall('HMGET', runsKey, unpack(rids, i, last))
    for j = 1, #raws do
      local rid = rids[i + j - 1]
      if runCache[rid] == nil then
        local rec = raws[j] and cmsgpack.unpack(raws[j]) or false
        runCache[rid] = rec
        if rec then stateOf[rid] = rec.st end
      end
    end
  end
end

-- The ms of the inbox entry a record's sequence encodes; the points of a run's path are stored
-- in µs after it (small numbers: three bytes each in msgpack while under 65 ms).
local function inboxMs(rec) return tonumber(string.sub(rec.s, 1, 16), 16) end
local inboxUsOf = {}   -- record -> inboxMs(rec) * 1000 (a run gets up to four points a call)

-- Records point `field` of the run's path at `us` (µs, any clock's epoch time; 0: unknown).
local function pointAt(rec, field, us)
  if type(us) == 'number' and us > 0 then
    local base = inboxUsOf[rec]
    if not base then base = inboxMs(rec) * 1000; inboxUsOf[rec] = base end
    rec[field] = us - base
  end
end

local function saveRun(rid, rec)
  if not runDirty[rid] then runDirty[#runDirty + 1] = rid; runDirty[rid] = true end
  runCache[rid] = rec
end

local function slotsOf(g)
  local n = slotCache[g]
  if n == nil then
    n = tonumber(rcall('HGET', slotsKey, g) or 0)
    slotCache[g] = n
  end
  return n
end

-- Loads the slot counts of many groups with one HMGET.
local function prefetchSlots(groups)
  for i = 1, #groups, 1000 do
    local last = math.min(i + 999, #groups)
    local vals = rcall('HMGET', slotsKey, unpack(groups, i, last))
    for j = 1, #vals do slotCache[groups[i + j - 1]] = tonumber(vals[j] or 0) end
  end
end

local function addSlots(g, delta)
  if not slotDirty[g] then slotDirty[#slotDirty + 1] = g; slotDirty[g] = true end
  slotCache[g] = slotsOf(g) + delta
end

-- The key-safe stand-in for a record's workflow id in the names of its streams: keys.py's
-- workflow_tag (sha1 hex, 12 chars), memoised for the call.
local tagOf = {}
local function workflowTag(rec)
  local tag = tagOf[rec.w]
  if not tag then tag = string.sub(redis.sha1hex(rec.w), 1, 12); tagOf[rec.w] = tag end
  return tag
end

-- Marks a run ended (its workflow's ended stream) and its input for deletion, at flush time.
local function markEnded(rid, rec, now, dropInput)
  endedAt = now
  local byState = endedBy[rec.w]
  if not byState then
    byState = {}
    endedBy[rec.w] = byState
    endedOrder[#endedOrder + 1] = rec.w
    workflowTag(rec)
  end
  local ids = byState[rec.st]
  if not ids then ids = {}; byState[rec.st] = ids end
  ids[#ids + 1] = rid
  if dropInput then droppedInputs[#droppedInputs + 1] = rid end
end

-- One entry per workflow with runs ended in this call. The id is the end time, unless the stream
-- already holds a later one (another process's clock, a test's); then the server picks.
local function flushEnded()
  for i = 1, #endedOrder do
    local w = endedOrder[i]
    local tag = tagOf[w]
    local stream = endedKey .. ':' .. tag
    local fields = {}
    for state, ids in pairs(endedBy[w]) do
      fields[#fields + 1] = state
      fields[#fields + 1] = table.concat(ids, ',')
    end
    local added = redis.pcall('XADD', stream, string.format('%d-*', endedAt), unpack(fields))
    if type(added) == 'table' and added.err then rcall('XADD', stream, '*', unpack(fields)) end
    rcall('HSET', endedKey, tag, w)
  end
  endedBy, endedOrder = {}, {}
end

local function callChunked(cmd, key, args, step)
  for i = 1, #args, step do
    rcall(cmd, key, unpack(args, i, math.min(i + step - 1, #args)))
  end
end

local function flushRuns()
  local args = {}
  for i = 1, #runDirty do
    local rid = runDirty[i]
    local rec = runCache[rid]
    args[#args + 1] = rid
    args[#args + 1] = cmsgpack.pack(rec)
    local was = stateOf[rid]
    if rec.c == 1 and was ~= rec.st then  -- (records from before the counts have no `c`)
      if was then countRun(rec.w, was, -1) end
      countRun(rec.w, rec.st, 1)
      stateOf[rid] = rec.st
    end
  end
  callChunked('HSET', runsKey, args, 1000)
  local set, del = {}, {}
  for i = 1, #slotDirty do
    local g = slotDirty[i]
    local v = slotCache[g]
    if v > 0 then set[#set + 1] = g; set[#set + 1] = v else del[#del + 1] = g end
  end
  callChunked('HSET', slotsKey, set, 1000)
  callChunked('HDEL', slotsKey, del, 1000)
  flushEnded()
  callChunked('HDEL', inputsKey, droppedInputs, 1000)
  flushCounts()
  local add, rem = {}, {}
  for i = 1, #leaseOrder do
    local rid = leaseOrder[i]
    local score = leaseAt[rid]
    if score then add[#add + 1] = score; add[#add + 1] = rid else rem[#rem + 1] = rid end
  end
  callChunked('ZADD', leasesKey, add, 1000)
  callChunked('ZREM', leasesKey, rem, 1000)
  runDirty, slotDirty, droppedInputs, leaseAt, leaseOrder = {}, {}, {}, {}, {}
end
