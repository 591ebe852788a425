--[[
  Run records and slot counters, cached for the length of one script call and written once.
  Needs the locals runsKey, slotsKey.
  A record is a msgpack map: st state, g group, s sequence, w workflow, v version, k key,
  ev event id, mx max_runs, sg strategy code, sx strict (0/1), a attempt, m max attempts,
  e executor, h (1: a CANCELLING run still holds its slot), t0..t3 created/assigned/claimed/
  ended ms, tc cancel decided ms, by superseding run id, why reason, err error text.
]]
local runCache, runDirty = {}, {}
local slotCache, slotDirty = {}, {}

local function loadRun(rid)
  local rec = runCache[rid]
  if rec == nil then
    local raw = rcall('HGET', runsKey, rid)
    rec = raw and cmsgpack.unpack(raw) or false
    runCache[rid] = rec
  end
  return rec or nil
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

local function addSlots(g, delta)
  if not slotDirty[g] then slotDirty[#slotDirty + 1] = g; slotDirty[g] = true end
  slotCache[g] = slotsOf(g) + delta
end

local function flushRuns()
  local args, n = {}, 0
  for i = 1, #runDirty do
    local rid = runDirty[i]
    args[n + 1] = rid
    args[n + 2] = cmsgpack.pack(runCache[rid])
    n = n + 2
    if n >= 1000 then rcall('HSET', runsKey, unpack(args, 1, n)); n = 0 end
  end
  if n > 0 then rcall('HSET', runsKey, unpack(args, 1, n)) end
  for i = 1, #slotDirty do
    local g = slotDirty[i]
    local v = slotCache[g]
    if v > 0 then rcall('HSET', slotsKey, g, v) else rcall('HDEL', slotsKey, g) end
  end
end
