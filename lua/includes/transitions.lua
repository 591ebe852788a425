--[[
  State transitions shared by the scripts that change run states, and the strategy rules.
  Needs the locals of the shard state KEYS (runsKey .. inputsKey), newestKey and newestAtKey,
  now, and runs.lua; a script that includes it calls flushNewest() at its end.
  Members of the queue and active zsets are '<group 16>|<sequence 32>|<run id>', all scored 0,
  so a lexicographic range is one group in arrival order.
]]
local RID_AT = 16 + 1 + 32 + 2
local stats = { assigned = 0, cancelled = 0, ended = 0 }
-- Runs cancelled by this call that carry a trace context (record field tp, only with tracing
-- on): {run id, tp, superseding run id, its tp, reason}, for the caller's cancel spans and
-- their links.
local traced = {}
local fresh = {}      -- run id -> input of runs created by this call, not yet written
local touched = {}    -- group id -> a record of that group (carries the limits), for refills
local touchedList = {}
local streamOf = {}   -- workflow id -> its assignment stream in the shard being served
local rungOf = {}     -- workflow id -> true when this call's bell on that stream rang

local function memberOf(rid, rec) return rec.g .. '|' .. rec.s .. '|' .. rid end
local function ridOf(m) return string.sub(m, RID_AT) end
local function groupOfMember(m) return string.sub(m, 1, 16) end   -- (see RID_AT)

-- Between the shards of a call that serves several: what the last one touched is written.
local function nextShard()
  touched, touchedList, fresh, streamOf, rungOf = {}, {}, {}, {}, {}
end

-- A draining executor hands back the runs it stops (hand_back.lua): the first FREE_HAND_BACKS
-- hand-backs of a run (record field hb) use none of its max attempts (m); its attempt number
-- (a) still counts every start, as the fencing of results needs.
local FREE_HAND_BACKS = 10
local function attemptsUsed(rec) return rec.a - math.min(rec.hb or 0, FREE_HAND_BACKS) end

-- How a run's attempt ended when another starts (its lease lapsed, or its executor handed it
-- back): the record's ea keeps the last EARLIER_KEPT, each {attempt, executor, claimed (point
-- pc, µs after the inbox entry; 0: not known), ended ms, reason}, for `supersede run`'s
-- timeline. Called before the attempt number moves on.
local EARLIER_KEPT = 5
local function noteEarlier(rec, why)
  local ea = rec.ea or {}
  ea[#ea + 1] = { rec.a, rec.e or '', rec.pc or 0, now, why }
  if #ea > EARLIER_KEPT then table.remove(ea, 1) end
  rec.ea = ea
end

-- A run of a workflow without a concurrency limit (u = 1) is in no group's books: it holds no
-- slot, is in neither the queue nor the active zset, and is assigned when admitted.
local function limited(rec) return rec.u ~= 1 end

local function touch(rec)
  if not limited(rec) then return end
  if not touched[rec.g] then touchedList[#touchedList + 1] = rec.g end
  touched[rec.g] = rec
end

-- CANCEL_IN_PROGRESS ranks arrivals against the newest max_runs runs its group ever admitted.
-- Live ones are in the active zset and the queue; ended ones are remembered here when they end
-- ('g|s|rid,...', at most max_runs per group; a superseded run is never among them, since the
-- runs that superseded it are newer). Cached for the call, like the slot counts; the runs that
-- end in a call are merged in once, when the group is ranked or the call ends (split, sorted
-- and joined at each end, a finish of 500 runs of a group at max_runs 10,000 took 8.5 s).
local newestCache, newestDirty = {}, {}   -- group -> members, or false when none is stored
-- group -> {members ended this call, unsorted; mx = the largest max_runs of theirs: a group
-- whose max_runs an expression computes keeps as many as its largest asks (the ranking walk
-- stops at each arrival's own max_runs)}
local endedNow = {}

local function prefetchNewest(groups)
  for i = 1, #groups, 1000 do
    local last = math.min(i + 999, #groups)
    local vals = rcall('HMGET', newestKey, unpack(groups, i, last))
    for j = 1, #vals do newestCache[groups[i + j - 1]] = vals[j] end
  end
end

-- The group's stored members merged with those ended this call: the newest mx, sorted.
local function mergeEnded(g)
  local ended = endedNow[g]
  endedNow[g] = nil
  table.sort(ended)
  local cur, old = newestCache[g], {}
  if cur then
    for x in string.gmatch(cur, '[^,]+') do old[#old + 1] = x end
  end
  local out, i, j = {}, #old, #ended   -- (from the newest end, mx at most)
  while #out < ended.mx and (i > 0 or j > 0) do
    if j == 0 or (i > 0 and old[i] > ended[j]) then
      out[#out + 1] = old[i]; i = i - 1
    else
      out[#out + 1] = ended[j]; j = j - 1
    end
  end
  for k = 1, math.floor(#out / 2) do out[k], out[#out - k + 1] = out[#out - k + 1], out[k] end
  newestCache[g] = table.concat(out, ',')
end

local function newestOf(g)
  local v = newestCache[g]
  if v == nil then
    v = rcall('HGET', newestKey, g)
    newestCache[g] = v
  end
  if endedNow[g] then
    mergeEnded(g)
    v = newestCache[g]
  end
  return v or nil
end

local function rememberEnded(g, m, mx)
  local ended = endedNow[g]
  if not ended then
    if newestCache[g] == nil then newestCache[g] = rcall('HGET', newestKey, g) end
    ended = { mx = mx }
    endedNow[g] = ended
  elseif mx > ended.mx then
    ended.mx = mx
  end
  ended[#ended + 1] = m
  if not newestDirty[g] then newestDirty[#newestDirty + 1] = g; newestDirty[g] = true end
end

local function flushNewest()
  local set, at = {}, {}
  for i = 1, #newestDirty do
    local g = newestDirty[i]
    if endedNow[g] then mergeEnded(g) end
    set[#set + 1] = g
    set[#set + 1] = newestCache[g]
    at[#at + 1] = now
    at[#at + 1] = g
  end
  callChunked('HSET', newestKey, set, 1000)
  callChunked('ZADD', newestAtKey, at, 1000)
  newestDirty = {}
end

-- Ends a run that holds no slot and is in neither zset any more. `unranked`: a run its group
-- never admitted (one waiting in a debounce window), which CANCEL_IN_PROGRESS must not rank.
local function endRun(rid, rec, state, why, by, unranked)
  local was = rec.st
  rec.st = state
  rec.t3 = now
  rec.h, rec.ai, rec.ra, rec.tr = nil, nil, nil, nil   -- (of a wait for a claim: over)
  if why then rec.why = why end
  if by then rec.by = by end
  if rec['in'] ~= nil then   -- (an input kept in the record goes with the run's end)
    rec['in'] = nil
    markEnded(rid, rec, now, false)
  elseif fresh[rid] then
    fresh[rid] = nil
    markEnded(rid, rec, now, false)
  else
    markEnded(rid, rec, now, true)
  end
  saveRun(rid, rec)
  stats.ended = stats.ended + 1
  if state == 'C' then stats.cancelled = stats.cancelled + 1 end
  -- (a CANCELLING run was remembered when it was cancelled, unless it was superseded)
  if rec.sg == 1 and was ~= 'X' and rec.why ~= 'superseded' and not unranked then
    rememberEnded(rec.g, memberOf(rid, rec), rec.mx)
  end
end

-- An ASSIGNED run is in the leases zset too, first due for a look when its assignment deadline
-- passes: the reaper re-assigns it if no executor claimed it by then. A script that knows the
-- deadline (the admission service's) sets assignDeadlineMs before this include; otherwise the
-- first look comes after a second, and the reaper puts the run back until its deadline.
local firstLookMs = (assignDeadlineMs and assignDeadlineMs > 0) and assignDeadlineMs or 1000

-- Each workflow has its own assignment stream in the shard, '<assignKey>:<workflow tag>', so
-- only executors that have a workflow ever read its runs. Same hash tag as assignKey: the same
-- slot on a cluster.
-- The first entry a call writes to a stream rings its bell: SPUBLISH on the shard channel of
-- the stream's own name (same slot), which executors of the workflow subscribe to instead of
-- blocking on every stream they read (a blocked read over every stream costs the server
-- each stream at every entry). A bell is a hint: pcall, so a server without SPUBLISH or a
-- user without the channel right loses only the hint (executors then find the entry by their
-- scan after a quiet wait). An entry whose bell rang says so (r = '1'): an executor that reads
-- one without it (this case, or a writer of a build before the bells in a rolling upgrade)
-- goes back to its blocking reads for a while instead of waiting for bells that never come.
local function writeAssignment(rid, rec)
  local assignStream = streamOf[rec.w]
  if not assignStream then
    assignStream = assignKey .. ':' .. workflowTag(rec)
    streamOf[rec.w] = assignStream
    local rang = redis.pcall('SPUBLISH', assignStream, '')
    rungOf[rec.w] = not (type(rang) == 'table' and rang.err)
  end
  -- (its id, in the record until the claim: the reaper tells from it whether the entry was
  -- delivered, which the ms of the write cannot: one call writes hundreds in the same ms)
  if rungOf[rec.w] then
    rec.ai = rcall('XADD', assignStream, '*', 'id', rid, 'a', rec.a, 'r', '1')
  else
    rec.ai = rcall('XADD', assignStream, '*', 'id', rid, 'a', rec.a)
  end
end

-- Hand-over (admit.lua only, `supersede serve`): runs of the workflows an executor in the
-- caller's process serves, while it has free slots, are claimed for it in the same call instead
-- of being written to an assignment stream: { e = executor id, l = lease ms, n = free slots,
-- w = set of workflow ids, out = run ids claimed }. Nil: every run goes to its stream.
local handOver = nil

local function assignRun(rid, rec)
  rec.t1 = now   -- (also point pg of the path, in µs; an earlier version's reaper reads t1)
  pointAt(rec, 'pg', nowUs)
  rec.ra = nil
  rec.tr = nil
  stats.assigned = stats.assigned + 1
  if handOver and handOver.n > 0 and handOver.w[rec.w] then
    -- claimed at once, as claim.lua would (RUNNING under the executor's lease)
    handOver.n = handOver.n - 1
    rec.st = 'R'
    rec.e = handOver.e
    rec.pe = nil
    rec.pc = rec.pg
    rec.ph, rec.t2, rec.er, rec.hs, rec.ai = nil, nil, nil, nil, nil
    setLease(rid, now + handOver.l)
    saveRun(rid, rec)
    handOver.out[#handOver.out + 1] = rid
    return
  end
  rec.st = 'A'
  rec.e = nil
  -- (an earlier attempt's read, claim and start: they came before this assignment, and its
  -- path showed `executor read ... (+-32155 ms)`; noteEarlier kept its claim)
  rec.pe, rec.pc, rec.ph = nil, nil, nil
  writeAssignment(rid, rec)
  setLease(rid, now + firstLookMs)
  saveRun(rid, rec)
end

-- The trace context of run `rid` ('' when it has none).
local function traceOf(rid)
  local rec = rid and loadRun(rid)
  return rec and rec.tp or ''
end

-- A run cancelled here: remembered for the caller's spans when it is traced.
local function noteTraced(rid, rec, by, why)
  if rec.tp then traced[#traced + 1] = { rid, rec.tp, by or '', traceOf(by), why or '' } end
end

-- The fields a cancel message adds for tracing: the superseding run's context, for a link.
local function traceFields(by)
  local tp = traceOf(by)
  if tp ~= '' then return { 'btp', tp } end
  return {}
end

-- A run that held a slot gives it back and leaves the active zset (a limited one).
-- (Its slot only with its member: a group whose active zset was lost gave back the slots of
-- the runs missing from it (see applyArrivals), and a run still live there took its slot a
-- second time when it ended, a review: slots at 0 with a run active.)
local function release(rid, rec)
  if limited(rec) then
    if rcall('ZREM', activeKey, memberOf(rid, rec)) == 1 then addSlots(rec.g, -1) end
    touch(rec)
  end
end

-- Runs failed by the lapse of their last attempt (reap.lua) or of their hand-backs
-- (hand_back.lua), counted by workflow for the caller's metrics (SupersedeRunsFailing).
local failedOf, failedOrder = {}, {}
local function endFailed(rid, rec, why)
  release(rid, rec)
  endRun(rid, rec, 'F', why)
  if not failedOf[rec.w] then failedOf[rec.w] = 0; failedOrder[#failedOrder + 1] = rec.w end
  failedOf[rec.w] = failedOf[rec.w] + 1
end

-- A CANCELLING run whose handler is gone (its lease lapsed, or its executor handed it back)
-- ends CANCELLED, and the slot it held (strict mode) is freed.
local function endCancelling(rid, rec)
  setLease(rid, false)
  if rec.h == 1 then addSlots(rec.g, -1); touch(rec) end
  endRun(rid, rec, 'C')
end

-- The reply `out`, then pairs: workflow id, runs of it failed (see endFailed).
local function withFailed(out)
  for _, w in ipairs(failedOrder) do
    out[#out + 1] = w
    out[#out + 1] = failedOf[w]
  end
  return out
end

-- A member whose record is gone (evicted at maxmemory under an evicting policy, deleted by
-- hand) leaves its zset, and an active one its slot: the script failed on it at every call
-- ("attempt to index a nil value"), its shard's requests stuck for good (a probe). Such a run
-- cannot end, nor be told: nothing of it is left to tell.
local ghosts = 0
local function dropGhost(m, zset)
  if rcall('ZREM', zset, m) == 0 then return end   -- (dropped already this call)
  if zset == activeKey then addSlots(groupOfMember(m), -1) end
  ghosts = ghosts + 1
end

-- The first `limit` queued members of group g whose records exist; those whose records are
-- gone, read on the way, are dropped (a FIFO group started a newer arrival before the runs
-- queued behind one). (Each record is loaded: the caller starts these runs.)
local function liveQueued(g, limit)
  local lo, hi = '(' .. g .. '|', '(' .. g .. '}'
  while true do
    local got = rcall('ZRANGEBYLEX', queueKey, lo, hi, 'LIMIT', 0, limit)
    local live = {}
    for i = 1, #got do
      if loadRun(ridOf(got[i])) then live[#live + 1] = got[i] else dropGhost(got[i], queueKey) end
    end
    if #live == #got or #got < limit then return live end
  end
end

-- A run leaves the active zset: ASSIGNED ends at once, RUNNING is told to stop.
local function cancelActive(m, why, by)
  local rid = ridOf(m)
  local rec = loadRun(rid)
  if not rec then return dropGhost(m, activeKey) end
  noteTraced(rid, rec, by, why)
  local held = limited(rec) and rcall('ZREM', activeKey, m) == 1   -- (see release)
  if rec.st == 'A' then
    if held then addSlots(rec.g, -1) end
    setLease(rid, false)
    endRun(rid, rec, 'C', why, by)
    return
  end
  rec.st = 'X'
  rec.tc = now
  pointAt(rec, 'px', nowUs)   -- (in µs: tc's whole ms hid up to a ms of the cancel latency)
  rec.why = why
  if by then rec.by = by end
  if rec.sg == 1 and why ~= 'superseded' then rememberEnded(rec.g, m, rec.mx) end
  if rec.sx == 1 then rec.h = 1 elseif held then addSlots(rec.g, -1) end
  rcall('XADD', controlKey, '*', 'op', 'cancel', 'id', rid, 'a', rec.a, 'by', by or '',
    'why', why, 'du', string.format('%d', nowUs), unpack(traceFields(by)))
  saveRun(rid, rec)
  stats.cancelled = stats.cancelled + 1
end

-- p: { m = member, stored = true when it is in the queue zset, unranked = true for a run
-- waiting in a debounce window (see endRun) }
local function cancelPending(p, why, by)
  local rid = ridOf(p.m)
  local rec = loadRun(rid)
  if not rec then
    if p.stored then dropGhost(p.m, queueKey) end
    return
  end
  noteTraced(rid, rec, by, why)
  if p.stored then rcall('ZREM', queueKey, p.m) end
  endRun(rid, rec, 'C', why, by, p.unranked)
end

-- False for a member whose record is gone (see dropGhost).
local function startPending(p)
  local rid = ridOf(p.m)
  local rec = loadRun(rid)
  if not rec then
    if p.stored then dropGhost(p.m, queueKey) end
    return false
  end
  if p.stored then rcall('ZREM', queueKey, p.m) end
  rcall('ZADD', activeKey, 0, p.m)
  addSlots(rec.g, 1)
  assignRun(rid, rec)
  return true
end

-- Queued runs of group g (oldest first, at most `limit` when given) merged with `news`
-- (members created by this call, sorted, not yet in the queue zset).
local function pendingOf(g, limit, news, queueEmpty)
  local lo, hi = '(' .. g .. '|', '(' .. g .. '}'
  local que
  if queueEmpty or (limit and limit <= 0) then
    que = {}
  elseif limit then
    que = liveQueued(g, limit)
  else
    que = rcall('ZRANGEBYLEX', queueKey, lo, hi)
  end
  local out, i, j = {}, 1, 1
  while i <= #que or j <= #news do
    if j > #news or (i <= #que and que[i] < news[j]) then
      out[#out + 1] = { m = que[i], stored = true }; i = i + 1
    else
      out[#out + 1] = { m = news[j], stored = false }; j = j + 1
    end
  end
  return out
end

-- Start pending runs oldest-first while slots are free; the rest keep (or take) their place.
local function fillFrom(g, mx, pending, first)
  local free = mx - slotsOf(g)
  for i = first, #pending do
    local p = pending[i]
    if free > 0 then
      if startPending(p) then free = free - 1 end
    elseif not p.stored then
      rcall('ZADD', queueKey, 0, p.m)
    end
  end
end

-- Applies the group's strategy after arrivals (`news`): the table in docs/design.md, "Strategies".
-- Invariants 1, 4 and 6 of docs/design.md are checked against this by the property test.
-- Without strict mode, CANCEL_IN_PROGRESS and CANCEL_NEWEST start or end every run they see,
-- so their groups never keep a queue between calls and the queue read is skipped; a group that
-- holds no slot has no active run either. Not so in a scope's group (`sc`): it spans versions,
-- and an earlier version's strategy (GROUP_ROUND_ROBIN, strict mode) may have left a queue,
-- whose runs, older than the arrival, are ranked with it (left out, they ran after the newest
-- one under CANCEL_IN_PROGRESS, a probe; and under CANCEL_NEWEST the arrival took a free slot
-- before them, and the other free slots waited for a run's end, a review).
local function applyArrivals(g, rec, news)
  local mx, sg = rec.mx, rec.sg
  if sg == 1 then
    -- CANCEL_IN_PROGRESS: the newest mx of the runs the group ever admitted survive; every
    -- older live one ends (so a late, older arrival loses to newer runs that already ended).
    local act, held = {}, slotsOf(g)
    if held > 0 then act = rcall('ZRANGEBYLEX', activeKey, '(' .. g .. '|', '(' .. g .. '}') end
    local queueEmpty = rec.sx ~= 1 and rec.sc ~= 1
    if queueEmpty and #act < held then
      -- Slots held by no member of the active zset (each run holding one is in it, outside
      -- strict mode: the zset or the runs' leases were evicted, or deleted by hand): given
      -- back, and the queue is read, which such a group filled (a probe's max_runs 1 group
      -- held 23 queued runs after an eviction, for good, with no line). The runs it held are
      -- counted as gone.
      addSlots(g, #act - held)
      ghosts = ghosts + held - #act
      queueEmpty = false
    end
    local pending = pendingOf(g, nil, news, queueEmpty)
    local ended, e = newestOf(g), {}
    if ended then
      for m in string.gmatch(ended, '[^,]+') do e[#e + 1] = m end
    end
    -- Ended runs count too. The three lists are sorted (all distinct members): walk them from
    -- the newest end; the first mx met survive, the live ones before them end (a sort of the
    -- lists put together took 9 ms a call at max_runs 10,000).
    local ie, ia, ip, kept = #e, #act, #pending, 0
    local newest
    while kept < mx and (ie > 0 or ia > 0 or ip > 0) do
      local m, from = e[ie], 1
      if ia > 0 and (ie == 0 or act[ia] > m) then m, from = act[ia], 2 end
      if ip > 0 and (ie == 0 and ia == 0 or pending[ip].m > m) then m, from = pending[ip].m, 3 end
      newest = newest or m
      if from == 1 then ie = ie - 1 elseif from == 2 then ia = ia - 1 else ip = ip - 1 end
      kept = kept + 1
    end
    if ia > 0 or ip > 0 then
      local by = ridOf(newest)
      for i = 1, ia do cancelActive(act[i], 'superseded', by) end
      for i = 1, ip do cancelPending(pending[i], 'superseded', by) end
    end
    fillFrom(g, mx, pending, ip + 1)
  elseif sg == 2 then
    -- CANCEL_NEWEST: fill free slots oldest-first; whatever cannot start now ends.
    local pending = pendingOf(g, nil, news, rec.sc ~= 1)
    local free = mx - slotsOf(g)
    for i = 1, #pending do
      if free <= 0 then
        cancelPending(pending[i], 'no_slot')
      elseif startPending(pending[i]) then
        free = free - 1
      end
    end
  elseif sg == 4 or sg == 5 then
    -- CANCEL_QUEUED_EXCEPT_NEWEST (4) / _OLDEST (5): fill free slots oldest-first; of the runs
    -- that must wait, one stays queued (the newest / the oldest) and the others end. Running
    -- work is never interrupted. (The queue holds at most one run between calls.)
    local pending = pendingOf(g, nil, news)
    local free = mx - slotsOf(g)
    local waiting = {}
    for i = 1, #pending do
      local p = pending[i]
      if free > 0 then
        if startPending(p) then free = free - 1 end
      else
        waiting[#waiting + 1] = p
      end
    end
    -- (the one kept, when queued before, may be a run whose record is gone: kept, it turned
    -- the live arrival away, a review. HEXISTS, not a load: this is every call of the group.)
    while sg == 5 and waiting[1] and waiting[1].stored
        and rcall('HEXISTS', runsKey, ridOf(waiting[1].m)) == 0 do
      dropGhost(table.remove(waiting, 1).m, queueKey)
    end
    local keep = sg == 4 and #waiting or 1
    local kept = waiting[keep]
    for i = 1, #waiting do
      local p = waiting[i]
      if i == keep then
        if not p.stored then rcall('ZADD', queueKey, 0, p.m) end
      elseif sg == 4 then
        cancelPending(p, 'superseded', ridOf(kept.m))
      else
        cancelPending(p, 'no_slot')
      end
    end
  else
    -- GROUP_ROUND_ROBIN: FIFO up to mx; nothing is cancelled.
    fillFrom(g, mx, pendingOf(g, mx - slotsOf(g), news), 1)
  end
end

-- After slots were released: start queued runs of every touched group.
local function refillTouched()
  for i = 1, #touchedList do
    local g = touchedList[i]
    local rec = touched[g]
    local free = rec.mx - slotsOf(g)
    if free > 0 then fillFrom(g, rec.mx, pendingOf(g, free, {}), 1) end
  end
end
