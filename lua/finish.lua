--[[
  Records a batch of outcomes reported by executors, releases the slots they held and fills
  them from the queue. A result for another attempt, or for a run that already ended, changes
  nothing (duplicate or late delivery). A CANCELLING run ends CANCELLED whatever it reports:
  results of cancelled runs are discarded. One call serves one shard, or several shards of one
  server (on a cluster each shard's keys live in their own slot, so a call serves one): the
  fixed cost of a call is paid once for the results of every shard read together.

  Input:
    KEYS[1..]   14 keys per shard, shard after shard; shard b's keys are KEYS[14(b-1) + i]:
      i = 1..10 the shard state keys, as in admit.lua
      i = 11    results stream (XACKed)
      i = 12    newest hash      as in admit.lua (an ended CANCEL_IN_PROGRESS run is remembered)
      i = 13    newest-at zset   as in admit.lua
      i = 14    outputs hash     run id -> msgpack step outputs (of runs that ended S or F)
    KEYS[14S + b]  with a turn (ARGV[5]): shard b's turn key of the calling executor (string
                   '<first>|<last>': the executor's turns first..last that touched the shard
                   all have their writes there)
    ARGV[1]     now in ms, or 0 for the server clock
    ARGV[2]     consumer group of the results stream
    ARGV[3]     assignment deadline in ms, as in admit.lua (for runs started in freed slots)
    ARGV[4]     results of each shard, comma-separated counts in KEYS order ('3,1,…'; the
                counts add up to the number of pairs)
    ARGV[5]     '' or '<turn>|<ttl ms>|<previous turn of shard 1>,<of shard 2>,...': an
                executor applying its own results numbers its calls (turns) and says, per
                shard, the last turn of its that touched the shard (0: none). The key and the
                results are written by one script, so they survive a crash or a failover
                together, and a server loses only its last writes: when the key's last turn is
                the previous one, the range goes on (first|turn); otherwise a turn was lost (or
                the key expired) and it starts again (turn|turn). A turn within the range has
                its writes there (the executor then need not ask about each of its runs).
    ARGV[6..]   pairs, shard by shard: results entry id, msgpack result
                {id, a, o = 'S'|'F'|'C', err, out, hu}
                (hu: when the handler started, µs, executor's clock; optional)

  Output:
    {0, applied, stale, assigned}
    {-1, i, field}  result i (counted over all shards) is malformed; nothing written
    {-2, i}         result i names a run that does not exist; nothing written
    {-4, 0}         bad ARGV or KEYS; nothing written

  Writes: XADD <ended>:<workflow tag> {<state> = run ids}; XADD <prefix>:<workflow tag> for
  runs started in the released slots; with a turn, SET of each shard's turn key.
  Each assignment stream written rings its bell once a call: SPUBLISH <its name> ''; its
  entries then carry r = '1' (read without it, executors keep their blocking reads).
]]
local rcall = redis.call
local runsKey, queueKey, activeKey, slotsKey, leasesKey, endedKey, assignKey, controlKey
local inputsKey, countsKey, resultsKey, newestKey, newestAtKey, outputsKey

-- Points the script's key locals at shard b's keys.
local function useShard(b)
  local o = (b - 1) * 14
  runsKey, queueKey, activeKey, slotsKey = KEYS[o + 1], KEYS[o + 2], KEYS[o + 3], KEYS[o + 4]
  leasesKey, endedKey, assignKey, controlKey = KEYS[o + 5], KEYS[o + 6], KEYS[o + 7], KEYS[o + 8]
  inputsKey, countsKey, resultsKey = KEYS[o + 9], KEYS[o + 10], KEYS[o + 11]
  newestKey, newestAtKey, outputsKey = KEYS[o + 12], KEYS[o + 13], KEYS[o + 14]
end

-- @include now
-- @include runs
-- @include ack

local now, nowUs = nowMs(ARGV[1])
local groupName, assignDeadlineMs = ARGV[2], tonumber(ARGV[3])
local counts, total = {}, 0
for c in string.gmatch(ARGV[4] or '', '[^,]+') do
  counts[#counts + 1] = tonumber(c)
  if not counts[#counts] or counts[#counts] < 0 then return { -4, 0 } end
  total = total + counts[#counts]
end
local turn, turnTtl, turnPrev = string.match(ARGV[5] or '', '^(%d+)|(%d+)|([%d,]+)$')
local previous = {}
for p in string.gmatch(turnPrev or '', '%d+') do previous[#previous + 1] = p end
if not groupName or not assignDeadlineMs or #counts == 0 or not ARGV[5]
    or (ARGV[5] ~= '' and (not turn or #previous ~= #counts))
    or #KEYS ~= (turn and 15 or 14) * #counts or #ARGV ~= 5 + 2 * total then
  return { -4, 0 }
end

-- @include transitions

-- Validate every result of every shard before writing anything.
local OUTCOMES = { S = true, F = true, C = true }
local function badResult(r)
  if type(r.id) ~= 'string' or r.id == '' then return 'id' end
  if type(r.a) ~= 'number' then return 'a' end
  if not OUTCOMES[r.o] then return 'o' end
  if r.err ~= nil and type(r.err) ~= 'string' then return 'err' end
  if r.out ~= nil and type(r.out) ~= 'string' then return 'out' end
  if r.hu ~= nil and type(r.hu) ~= 'number' then return 'hu' end
  return nil
end

local results = {}
local n = 0
for b = 1, #counts do
  useShard(b)
  local first, bad, field = n + 1, nil, nil
  local ids = {}
  for _ = 1, counts[b] do
    n = n + 1
    local ok, r = pcall(cmsgpack.unpack, ARGV[5 + 2 * n])
    field = (not ok or type(r) ~= 'table') and 'payload' or badResult(r)
    if field then bad = n; break end
    results[n] = r
    ids[#ids + 1] = r.id
  end
  prefetchRuns(ids)   -- (one HMGET for the shard's records)
  for m = first, (bad or n + 1) - 1 do
    if not loadRun(results[m].id) then return { -2, m } end
  end
  if bad then return { -1, bad, field } end
end

local applied, stale = 0, 0
n = 0
for b = 1, #counts do
  useShard(b)
  local first = n + 1
  local outputs = {}   -- run id, outputs, ... of runs that ended here SUCCEEDED or FAILED
  for _ = 1, counts[b] do
    n = n + 1
    local r = results[n]
    local rec = loadRun(r.id)
    if rec.a ~= r.a then
      stale = stale + 1
    elseif rec.st == 'R' then
      setLease(r.id, false)
      release(r.id, rec)
      if r.err then rec.err = r.err end
      pointAt(rec, 'ph', r.hu)
      endRun(r.id, rec, r.o, r.o == 'C' and 'executor' or nil)
      if r.out and r.o ~= 'C' then outputs[#outputs + 1] = r.id; outputs[#outputs + 1] = r.out end
      applied = applied + 1
    elseif rec.st == 'X' then
      setLease(r.id, false)
      if rec.h == 1 then addSlots(rec.g, -1); touch(rec) end
      pointAt(rec, 'ph', r.hu)   -- (a run cancelled while running did start)
      endRun(r.id, rec, 'C')
      applied = applied + 1
    else
      stale = stale + 1
    end
  end
  if n >= first then
    refillTouched()
    callChunked('HSET', outputsKey, outputs, 1000)
    ackEntries(resultsKey, groupName, 4 + 2 * first, 2, 4 + 2 * n)
    flushRuns()
    flushNewest()
    nextShard()
  end
end
if turn then
  for b = 1, #counts do
    local key = KEYS[14 * #counts + b]
    local first, last = string.match(rcall('GET', key) or '', '^(%d+)|(%d+)$')
    if not (last and last == previous[b] and previous[b] ~= '0') then first = turn end
    rcall('SET', key, first .. '|' .. turn, 'PX', turnTtl)
  end
end
return { 0, applied, stale, stats.assigned }
