--[[
  Admits a batch of run requests of one shard: creates the runs, applies each touched group's
  strategy, writes assignments and cancel messages, and acknowledges the batch, all at once.
  A request whose run id already exists changes nothing (duplicate delivery).

  Input:
    KEYS[1]  runs hash          run id -> msgpack record
    KEYS[2]  queue zset         QUEUED members (lexicographic)
    KEYS[3]  active zset        ASSIGNED and RUNNING members
    KEYS[4]  slots hash         group id -> slots held
    KEYS[5]  leases zset        run id by lease expiry (ms)
    KEYS[6]  ended hash         workflow tag -> workflow; ended runs go to the stream
                                '<KEYS[6]>:<workflow tag>' (one entry per call and state)
    KEYS[7]  assignments prefix   the stream of a workflow is '<prefix>:<workflow tag>'
    KEYS[8]  control stream
    KEYS[9]  inputs hash        run id -> input
    KEYS[10] counts hash        '<workflow>|<state>' -> runs in that state (status, gauges)
    KEYS[11] requests stream    the stream the batch was read from (XACKed)
    KEYS[12] newest hash        group id -> the newest max_runs members it ever admitted
                                (CANCEL_IN_PROGRESS: a late, older arrival loses to them)
    KEYS[13] newest-at zset     group id by its last admission (ms), for expiry by reap
    KEYS[14] fences hash        group id -> the sequence of the newest run it ever admitted
                                (ctx.still_current() reads it); '<group id>|last' ->
                                '<seq>|<run id>' of the run a debounced group's last window
                                let through (fire_debounced.lua writes it): an older arrival
                                ends at once
    KEYS[15] debounce hash      group id -> '<window start ms>|<member>': a debounced group's
                                waiting run (requests with db > 0)
    KEYS[16] due zset           debounced group ids by when their waiting run is due (ms);
                                fire_debounced.lua applies the group's strategy to it then
    ARGV[1]  now in ms, or 0 for the server clock
    ARGV[2]  consumer group of the requests stream
    ARGV[3]  this shard's number (every run id must start with '<shard>-')
    ARGV[4]  when admission read the batch (µs, its clock), or 0 when unknown
    ARGV[5]  assignment deadline in ms: when the reaper first looks at an unclaimed ASSIGNED
             run (0: after a second, then at the reaper's deadline)
    ARGV[6]  hand-over ('' : none): msgpack {e = executor id, l = lease ms, n = its free
             slots, w = [workflow ids it serves]}: up to n runs of those workflows that this
             call assigns are claimed for that executor at once (RUNNING under its lease, as
             claim.lua would) instead of being written to their assignment streams. Only
             `supersede serve` asks, for the executor of its own process.
    ARGV[7..] triples: requests-stream entry id ('': a request handed over in the caller's
              process, never written to the stream; nothing to acknowledge; the requests of
              one entry come one after the other, with its id each), msgpack request
              {id, g, s, w, v, k, ev, max, st, x, m, in, iu, u, tp, db, dw, sc}, when the request was
              written (µs, the entry's t field; 0: unknown, the entry id's ms is used)
              (iu: when ingress read the event, µs; optional. u = 1: the workflow has no
              concurrency limit; the run is assigned at once, outside any group's books.
              tp: the run's W3C traceparent, '' when it is not traced. db > 0: debounce ms,
              dw: the longest wait in ms after the window's first event, 0: none; the run
              waits (QUEUED, in no queue) until no newer event of its group came for db ms,
              and a newer one supersedes it. sc = 1: the workflow's groups are a scope's,
              shared by its versions)

  Output:
    {0, created, duplicates, assigned, cancelled (, traced (, due (, handed (, gone))))}
                    traced (present when some are, or when a later field is): {run id, tp,
                    superseding run id, its tp, reason} for each cancelled run that carries a
                    trace context; due (present when the call set debounce timers, or with a
                    hand-over; 0: none set): the earliest it set, ms; handed (with a hand-over):
                    {run id, attempt, workflow, version, input, key, sequence, tp, state} for
                    each run claimed for the executor (state 'R', or 'X' when this call also
                    cancelled it: its cancel message is in the control stream); gone
                    (present when some were): runs whose records or members were gone
                    (evicted, deleted by hand), their members dropped, their slots freed
    {-1, i, field}  request i is malformed (names the first bad field); nothing written
    {-3, i}         request i belongs to another shard; nothing written
    {-4, 0}         bad ARGV; nothing written

  Writes: XADD <prefix>:<workflow tag> {id, a[, r]}; XADD control {op = 'cancel', id, a, by, why
  [, btp]} (btp: the superseding run's tp, when it has one); XADD <ended>:<workflow tag>
  {<state> = run ids}.
  Each assignment stream written rings its bell once a call: SPUBLISH <its name> ''; its
  entries then carry r = '1' (read without it, executors keep their blocking reads).
]]
local rcall = redis.call
local runsKey, queueKey, activeKey, slotsKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local leasesKey, endedKey, assignKey, controlKey = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local inputsKey, countsKey, requestsKey = KEYS[9], KEYS[10], KEYS[11]
local newestKey, newestAtKey, fencesKey = KEYS[12], KEYS[13], KEYS[14]
local debounceKey, dueKey = KEYS[15], KEYS[16]

-- @include now
-- @include runs
-- @include validate
-- @include ack

local now, nowUs = nowMs(ARGV[1])
local groupName, shardPrefix = ARGV[2], (ARGV[3] or '') .. '-'
local readUs, assignDeadlineMs = tonumber(ARGV[4]), tonumber(ARGV[5])
if not ARGV[3] or not readUs or not assignDeadlineMs or not ARGV[6] or (#ARGV - 6) % 3 ~= 0 then
  return { -4, 0 }
end

-- @include transitions

if ARGV[6] ~= '' then
  local ok, spec = pcall(cmsgpack.unpack, ARGV[6])
  if not ok or type(spec) ~= 'table' or type(spec.e) ~= 'string' or type(spec.w) ~= 'table'
      or not tonumber(spec.l) or tonumber(spec.l) <= 0 or not tonumber(spec.n) then
    return { -4, 0 }
  end
  local serves = {}
  for i = 1, #spec.w do serves[spec.w[i]] = true end
  handOver = { e = spec.e, l = tonumber(spec.l), n = tonumber(spec.n), w = serves, out = {} }
end

-- Validate the whole batch before writing anything.
local reqs, written = {}, {}
for i = 7, #ARGV, 3 do
  local n = (i - 4) / 3
  local ok, req = pcall(cmsgpack.unpack, ARGV[i + 1])
  if not ok or type(req) ~= 'table' then return { -1, n, 'payload' } end
  local bad = badRequestField(req)
  if bad then return { -1, n, bad } end
  if string.sub(req.id, 1, #shardPrefix) ~= shardPrefix then return { -3, n } end
  if req.iu ~= nil and type(req.iu) ~= 'number' then return { -1, n, 'iu' } end
  reqs[n] = req
  local at = tonumber(ARGV[i + 2])
  if not at or at <= 0 then   -- the entry id's ms; now for a request handed over
    local ms = tonumber(string.match(ARGV[i], '^(%d+)'))
    at = ms and ms * 1000 or nowUs
  end
  written[n] = at
end

local rids = {}
for n = 1, #reqs do rids[n] = reqs[n].id end
prefetchRuns(rids)

local created, dups = 0, 0
local news, newsList = {}, {}
local waits, waitsList, waitOf = {}, {}, {}   -- debounced arrivals: group -> members
for n = 1, #reqs do
  local q = reqs[n]
  local rid = q.id
  if loadRun(rid) then
    dups = dups + 1
  else
    -- (strict mode only when on, and no strategy for a run without a limit: a record's size
    -- decides its allocation class, so a field nobody reads costs more than its bytes)
    -- (every field a live record may get is named here, nil or not: the constructor sizes
    -- the table for them, so the fields set later cost no rehash)
    local ev, input = q.ev or '', q['in'] or ''
    local inline = #input <= INLINE_INPUT_BYTES
    local rec = {
      st = 'Q', g = q.g, s = q.s, w = q.w, v = q.v, ev = ev,
      mx = q.max, sg = q.st, sx = q.x == 1 and 1 or nil, sc = q.sc == 1 and 1 or nil,
      a = 1, m = q.m or 3, t0 = now, c = 1,
      -- (a key equal to the event id, as every run of a workflow without a limit has, is not
      -- stored twice: readers take ev when k is absent)
      k = (q.k or '') ~= ev and (q.k or '') or nil,
      tp = (q.tp and q.tp ~= '') and q.tp or nil,
      ['in'] = inline and input or nil,
      pi = nil, pw = nil, pa = nil, t1 = nil, pg = nil, e = nil, u = nil,
    }
    pointAt(rec, 'pi', q.iu)
    pointAt(rec, 'pw', written[n])
    pointAt(rec, 'pa', readUs)
    if not inline then fresh[rid] = input end
    if q.u == 1 then
      rec.u, rec.sg, rec.mx = 1, nil, nil
      assignRun(rid, rec)   -- no concurrency limit: no group to rank or fill
    elseif (q.db or 0) > 0 then
      saveRun(rid, rec)   -- QUEUED, in no queue: it waits for its debounce window
      local list = waits[q.g]
      if not list then list = {}; waits[q.g] = list; waitsList[#waitsList + 1] = q.g end
      local m = memberOf(rid, rec)
      list[#list + 1] = m
      waitOf[m] = q
    else
      saveRun(rid, rec)
      local list = news[q.g]
      if not list then list = {}; news[q.g] = list; newsList[#newsList + 1] = q.g end
      list[#list + 1] = memberOf(rid, rec)
      touch(rec)
    end
    created = created + 1
  end
end

prefetchSlots(newsList)
prefetchNewest(newsList)
local fenced, arrived = {}, {}   -- group -> its fence; the groups of this call
for i = 1, #newsList do arrived[#arrived + 1] = newsList[i] end
for i = 1, #waitsList do arrived[#arrived + 1] = waitsList[i] end
for j = 1, #arrived, 1000 do
  local part = { unpack(arrived, j, math.min(j + 999, #arrived)) }
  local got = rcall('HMGET', fencesKey, unpack(part))
  for k = 1, #got do fenced[part[k]] = got[k] end
end
local fences, admittedAt = {}, {}
-- The group's fence: the newest sequence it admitted that its strategy did not end on arrival
-- (a late, older arrival leaves it, and so does one CANCEL_NEWEST turns away).
local function advanceFence(g, list)
  for j = #list, 1, -1 do
    local rec = loadRun(ridOf(list[j]))
    if rec and rec.st ~= 'C' then
      local seq = string.sub(list[j], 18, 49)
      if not fenced[g] or fenced[g] < seq then
        fences[#fences + 1] = g
        fences[#fences + 1] = seq
      end
      return
    end
  end
end
for i = 1, #newsList do
  local g = newsList[i]
  local list = news[g]
  table.sort(list)
  admittedAt[#admittedAt + 1] = now
  admittedAt[#admittedAt + 1] = g
  applyArrivals(g, touched[g], list)
  advanceFence(g, list)
end

-- Debounced groups: the newest arrival waits; the run it replaces (or an older arrival) ends.
-- The window closes db ms after its newest event, at most dw ms after its first.
local firstDue
if #waitsList > 0 then
  local cur = rcall('HMGET', debounceKey, unpack(waitsList))
  local lastFields = {}
  for i = 1, #waitsList do lastFields[i] = waitsList[i] .. '|last' end
  local last = rcall('HMGET', fencesKey, unpack(lastFields))
  local stored, timers = {}, {}
  for i = 1, #waitsList do
    local g = waitsList[i]
    local list = waits[g]
    table.sort(list)
    local first, waiting
    local fired = last[i] and g .. '|' .. last[i]   -- (the member its last window let through)
    if cur[i] then
      local bar = string.find(cur[i], '|', 1, true)
      first, waiting = tonumber(string.sub(cur[i], 1, bar - 1)), string.sub(cur[i], bar + 1)
      local rec = loadRun(ridOf(waiting))
      if not rec or rec.st ~= 'Q' then first, waiting = nil, nil end   -- (cancelled by hand)
    end
    local moved = false
    for j = 1, #list do
      local m = list[j]
      if waiting and m < waiting then   -- older than the waiting run: it never starts
        cancelPending({ m = m, stored = false }, 'superseded', ridOf(waiting))
      elseif fired and m < fired then
        -- older than the run the last window let through: it arrived after that window closed
        -- (a slow ingress, a redelivery) and never starts (it opened a window of its own, and
        -- under GROUP_ROUND_ROBIN ran after the newer one, a probe); whatever window is open
        -- now, or was cancelled by hand since
        cancelPending({ m = m, stored = false }, 'superseded', ridOf(fired))
      else
        if waiting then
          cancelPending({ m = waiting, stored = false }, 'superseded', ridOf(m))
        else
          first = now
        end
        waiting, moved = m, true
      end
    end
    if moved then
      local q = waitOf[waiting]
      local due = now + q.db
      if (q.dw or 0) > 0 and first + q.dw < due then due = first + q.dw end
      stored[#stored + 1] = g
      stored[#stored + 1] = first .. '|' .. waiting
      timers[#timers + 1] = due
      timers[#timers + 1] = g
      if not firstDue or due < firstDue then firstDue = due end
    end
    advanceFence(g, list)
    admittedAt[#admittedAt + 1] = now
    admittedAt[#admittedAt + 1] = g
  end
  callChunked('HSET', debounceKey, stored, 1000)
  callChunked('ZADD', dueKey, timers, 1000)
end
callChunked('HSET', fencesKey, fences, 1000)
callChunked('ZADD', newestAtKey, admittedAt, 1000)

-- Inputs of runs that survived this call.
local inputs = {}
for rid, input in pairs(fresh) do
  inputs[#inputs + 1] = rid
  inputs[#inputs + 1] = input
end
callChunked('HSET', inputsKey, inputs, 1000)

ackEntries(requestsKey, groupName, 7, 3)
local handed
if handOver then
  -- (inputs: in the record, or a run created by this call still has its own in `fresh`)
  handed = {}
  local need = {}
  for i = 1, #handOver.out do
    local rid = handOver.out[i]
    if not fresh[rid] and loadRun(rid)['in'] == nil then need[#need + 1] = rid end
  end
  local stored = {}
  for j = 1, #need, 1000 do
    local got = rcall('HMGET', inputsKey, unpack(need, j, math.min(j + 999, #need)))
    for k = 1, #got do stored[need[j + k - 1]] = got[k] end
  end
  for i = 1, #handOver.out do
    local rid = handOver.out[i]
    local rec = loadRun(rid)
    if rec.e == handOver.e and (rec.st == 'R' or rec.st == 'X') then
      handed[#handed + 1] = {
        rid, rec.a, rec.w, rec.v, rec['in'] or fresh[rid] or stored[rid] or '', rec.k or rec.ev,
        rec.s, rec.tp or '', rec.st,
      }
    end
  end
end
flushRuns()
flushNewest()
if handed or ghosts > 0 then
  return { 0, created, dups, stats.assigned, stats.cancelled, traced, firstDue or 0, handed or {},
           ghosts }
end
if firstDue then return { 0, created, dups, stats.assigned, stats.cancelled, traced, firstDue } end
if #traced > 0 then return { 0, created, dups, stats.assigned, stats.cancelled, traced } end
return { 0, created, dups, stats.assigned, stats.cancelled }
