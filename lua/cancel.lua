--[[
  Cancels runs by id (an operator's or API cancel). A QUEUED or ASSIGNED run ends CANCELLED
  and never starts; a RUNNING run becomes CANCELLING and its executor is told on the control
  stream. Released slots are refilled. Runs that already ended or are CANCELLING are left as
  they are.

  Input:
    KEYS[1..10] the shard state keys, as in admit.lua
    KEYS[11]    newest hash      as in admit.lua
    KEYS[12]    newest-at zset   as in admit.lua
    KEYS[13]    debounce hash    as in admit.lua (a run waiting in its debounce window was
                                 never admitted to its group: CANCEL_IN_PROGRESS does not rank it
                                 once it is cancelled)
    ARGV[1]     now in ms, or 0 for the server clock
    ARGV[2]     reason recorded on the runs (e.g. 'manual')
    ARGV[3..]   run ids

  Output:
    {0, flag, ...}  one flag per run id: 1 cancelled by this call, 0 already ended/cancelling
    {-2, i}         run i does not exist; nothing written
    {-4, 0}         bad ARGV; nothing written

  Writes: XADD <ended>:<workflow tag> for runs ended; XADD control for RUNNING runs;
  XADD <prefix>:<workflow tag> for runs started in freed slots.
  Each assignment stream written rings its bell once a call: SPUBLISH <its name> ''; its
  entries then carry r = '1' (read without it, executors keep their blocking reads).
]]
local rcall = redis.call
local runsKey, queueKey, activeKey, slotsKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local leasesKey, endedKey, assignKey, controlKey = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local inputsKey, countsKey = KEYS[9], KEYS[10]
local newestKey, newestAtKey, debounceKey = KEYS[11], KEYS[12], KEYS[13]

-- @include now
-- @include runs

local now, nowUs = nowMs(ARGV[1])
local reason = ARGV[2]
if not reason or reason == '' then return { -4, 0 } end

local assignDeadlineMs = 0   -- (an operator's call: the reaper's first look comes after 1 s)
-- @include transitions

for i = 3, #ARGV do
  if not loadRun(ARGV[i]) then return { -2, i - 2 } end
end

local out = { 0 }
for i = 3, #ARGV do
  local rid = ARGV[i]
  local rec = loadRun(rid)
  local st = rec.st
  if st == 'Q' then
    local m, waiting = memberOf(rid, rec), false
    if rec.sg == 1 then
      local cur = rcall('HGET', debounceKey, rec.g)
      waiting = cur and string.sub(cur, string.find(cur, '|', 1, true) + 1) == m or false
    end
    cancelPending({ m = m, stored = not waiting, unranked = waiting }, reason)
  elseif st == 'A' or st == 'R' then
    cancelActive(memberOf(rid, rec), reason)
    touch(rec)
  end
  out[#out + 1] = (st == 'Q' or st == 'A' or st == 'R') and 1 or 0
end

refillTouched()
flushRuns()
flushNewest()
return out
