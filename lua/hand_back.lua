--[[
  Hands back the runs a draining executor stopped (its drain deadline passed, or a step's retry
  would have started after it): each is retried at once (attempt + 1, same sequence, same slot,
  a new assignment) instead of after its lease, and the hand-back does not use up one of its
  attempts: a rolling deploy of the executors does not fail a run that outlasts the drain. A
  run may be handed back FREE_HAND_BACKS times (transitions.lua) without using an attempt;
  past that each hand-back uses one, as a lapsed lease does (a pool that keeps being stopped,
  its pods crash-looping, then fails its runs rather than moving them about for ever). A run
  of a workflow with one attempt (max_attempts = 1: never run twice) is not handed back: it is
  left to its lease, as before. A CANCELLING run ends CANCELLED (its step has stopped). Only
  the caller's own attempt is touched: a run re-assigned meanwhile, ended, or of another
  executor or attempt is left as it is (counted stale).

  Input:
    KEYS[1..10] the shard state keys, as in admit.lua
    KEYS[11]    newest hash      as in admit.lua
    KEYS[12]    newest-at zset   as in admit.lua
    ARGV[1]     now in ms, or 0 for the server clock
    ARGV[2]     assignment deadline in ms, as in admit.lua
    ARGV[3]     executor id (the record's e)
    ARGV[4..]   pairs: run id, attempt

  Output:
    {0, handed back, cancelled, failed, stale, then pairs: workflow id, runs of it failed}
                failed: past FREE_HAND_BACKS with no attempts left (FAILED, handed_back)
    {-4, 0}     bad ARGV; nothing written

  Writes: XADD <prefix>:<workflow tag> for the runs handed back and for runs started in
  released slots.
  Each assignment stream written rings its bell once a call: SPUBLISH <its name> ''; its
  entries then carry r = '1' (read without it, executors keep their blocking reads).
]]
local rcall = redis.call
local runsKey, queueKey, activeKey, slotsKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local leasesKey, endedKey, assignKey, controlKey = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local inputsKey, countsKey = KEYS[9], KEYS[10]
local newestKey, newestAtKey = KEYS[11], KEYS[12]

-- @include now
-- @include runs

local now, nowUs = nowMs(ARGV[1])
local assignDeadlineMs, executor = tonumber(ARGV[2]), ARGV[3]
if not assignDeadlineMs or not executor or executor == '' or #ARGV % 2 ~= 1 then
  return { -4, 0 }
end
for i = 4, #ARGV, 2 do
  if ARGV[i] == '' or not tonumber(ARGV[i + 1]) then return { -4, 0 } end
end

-- @include transitions

local rids = {}
for i = 4, #ARGV, 2 do rids[#rids + 1] = ARGV[i] end
prefetchRuns(rids)

local handed, cancelled, failed, stale = 0, 0, 0, 0
for i = 4, #ARGV, 2 do
  local rid, attempt = ARGV[i], tonumber(ARGV[i + 1])
  local rec = loadRun(rid)
  if not rec or rec.a ~= attempt or rec.e ~= executor then
    stale = stale + 1
  elseif rec.st == 'R' and (rec.m or 1) > 1 then
    setLease(rid, false)
    rec.hb = (rec.hb or 0) + 1
    rec.hq = 1   -- (its next claim tells the executor: it counts the restart)
    if attemptsUsed(rec) < rec.m then
      noteEarlier(rec, 'handed_back')
      rec.a = rec.a + 1
      assignRun(rid, rec)
      handed = handed + 1
    else  -- (its attempt stays the last one started: one more showed a start never made)
      endFailed(rid, rec, 'handed_back')
      failed = failed + 1
    end
  elseif rec.st == 'X' then
    endCancelling(rid, rec)
    cancelled = cancelled + 1
  else
    stale = stale + 1   -- (one attempt only: left to its lease)
  end
end

refillTouched()
flushRuns()
flushNewest()
return withFailed({ 0, handed, cancelled, failed, stale })
