--[[
  Handles expired leases and old records. A RUNNING run whose lease expired is retried (attempt
  + 1, same sequence, same slot, a new assignment) while attempts remain (a drain's hand-backs
  use none: see hand_back.lua), else it FAILS and its
  slot is refilled. A CANCELLING run whose lease expired ends CANCELLED. An ASSIGNED run that no
  executor claimed within the assignment deadline gets a fresh assignment entry (same attempt;
  its entry may be gone, or held by an executor that cannot claim it), then again after twice,
  four times ... up to 64 times the deadline, so its slot is never held by a run nobody can
  claim; a duplicate entry is refused by claim. No fresh entry is written while the last one
  surely still waits unread in its stream (no executor of the workflow read that far: it
  would only grow the stream); the run is looked at again after about as long as it has
  waited, 1 to 64 deadlines. Records of
  runs that ended more than their workflow's retention ago are deleted with their entries of
  the ended streams. A group's memory (its newest runs and its fence) is forgotten once it
  admitted nothing for the default retention, or, while the shard remembers more groups than
  the cap, the least recently admitting first, though none that admitted within the floor
  (ARGV[6]), nor one with a run holding a slot or a debounce window open (it counts as
  admitting now).

  Input:
    KEYS[1..10] the shard state keys, as in admit.lua
    KEYS[11]    newest hash      as in admit.lua
    KEYS[12]    newest-at zset   as in admit.lua
    KEYS[13]    legacy terminal zset  run id by end time, from before the ended streams:
                                      drained with the default retention, never written
    KEYS[14]    outputs hash     as in finish.lua (deleted with the records)
    KEYS[15]    fences hash      as in admit.lua
    KEYS[16]    debounce hash    as in admit.lua (a group with a window open is kept)
    KEYS[17?]   outcome string   (optional) where a call with a token (ARGV[8]) that retried,
                                 failed or cancelled runs keeps '<token>|<its reply, msgpack>'
                                 10 minutes:
                                 the caller's next call reads it when this one's reply was
                                 lost (a link stalled past the client's timeout, the call run
                                 once it healed: its retries and failures went uncounted)
    ARGV[1]     now in ms, or 0 for the server clock
    ARGV[2]     at most this many leases and about this many old records per call (whole
                ended-stream entries are expired, so up to one entry's runs more)
    ARGV[3]     default retention of ended runs in ms
    ARGV[4]     assignment deadline in ms
    ARGV[5]     at most this many ended runs of one workflow kept in this shard, the oldest
                expired first whatever their age (0: no cap); counted from the counts hash,
                and not applied while the legacy terminal zset still holds runs (its runs are
                counted too, but expire by the default retention only)
    ARGV[6]     no run is expired sooner than this many ms after it ended, whatever the
                retention or the cap (records are the de-duplication memory), and no group
                is forgotten by the cap sooner than this many ms after it last admitted a run
    ARGV[7]     at most this many groups remembered in this shard (0: no cap)
    ARGV[8]     the call's token for KEYS[17] ('': nothing kept)
    ARGV[9..]   pairs: workflow id, its own retention in ms

  Output:
    {0, retried, failed, cancelled, expired records, assigned, reassigned, forgotten groups,
     leases looked at (when it is the limit, more may be due), runs whose records were gone
     (their members dropped, their slots freed), then pairs: workflow id, runs of it failed}
    {-4, 0}  bad ARGV; nothing written

  Writes: XADD <prefix>:<workflow tag> for retries, for runs started in released slots and for
  fresh entries of unclaimed runs.
  Each assignment stream written rings its bell once a call: SPUBLISH <its name> ''; its
  entries then carry r = '1' (read without it, executors keep their blocking reads).
]]
local rcall = redis.call
local runsKey, queueKey, activeKey, slotsKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local leasesKey, endedKey, assignKey, controlKey = KEYS[5], KEYS[6], KEYS[7], KEYS[8]
local inputsKey, countsKey = KEYS[9], KEYS[10]
local newestKey, newestAtKey, legacyTerminalKey = KEYS[11], KEYS[12], KEYS[13]
local outputsKey, fencesKey, debounceKey = KEYS[14], KEYS[15], KEYS[16]

-- @include now
-- @include runs
-- @include cap

local now, nowUs = nowMs(ARGV[1])
local limit, retention, deadline = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
local cap, floor, maxGroups = tonumber(ARGV[5]), tonumber(ARGV[6]), tonumber(ARGV[7])
if not limit or limit < 1 or not retention or not deadline or deadline <= 0 or not cap
    or not floor or not maxGroups or #ARGV % 2 ~= 0 then
  return { -4, 0 }
end
local token = ARGV[8]
local keepOf = {}
for i = 9, #ARGV, 2 do
  keepOf[ARGV[i]] = tonumber(ARGV[i + 1])
  if not keepOf[ARGV[i]] then return { -4, 0 } end
end

local assignDeadlineMs = deadline
-- @include transitions

-- Whether the last assignment entry of an ASSIGNED run surely still waits in its stream for
-- its first reading: its id (the record's ai) is past what any group of the stream has had
-- delivered, and the stream still reaches it (trimming never removes what no group was
-- delivered). Then a fresh entry would only grow a stream nobody reads yet (a workflow whose
-- executors are not up, or a backlog they are working off): the run is looked at again later
-- instead. An entry delivered to some consumer (it may hold it, dead or unable to claim it)
-- or gone (a failover, a trim by hand) gets a fresh one. A record from before ai has only the
-- ms of its write (tr or t1), and so was judged by ms: a call writes hundreds of entries in
-- one ms, all of which counted as delivered once one was. Per stream: the newest delivered
-- id and the last entry's, once per call.
local function idParts(id)
  local ms, seq = string.match(id, '^(%d+)-(%d+)$')
  return tonumber(ms), tonumber(seq)
end
local function idAfter(ms, seq, ms2, seq2) return ms > ms2 or (ms == ms2 and seq > seq2) end

local streamsSeen = {}
local function waitsUnread(rid, rec)
  local stream = assignKey .. ':' .. workflowTag(rec)
  local seen = streamsSeen[stream]
  if not seen then
    seen = { delivered = -1, deliveredSeq = -1, last = -1, lastSeq = -1 }
    local tail = rcall('XREVRANGE', stream, '+', '-', 'COUNT', 1)
    if #tail > 0 then
      seen.last, seen.lastSeq = idParts(tail[1][1])
      for _, g in ipairs(rcall('XINFO', 'GROUPS', stream)) do
        for k = 1, #g, 2 do
          if g[k] == 'last-delivered-id' then
            local ms, seq = idParts(g[k + 1])
            if idAfter(ms, seq, seen.delivered, seen.deliveredSeq) then
              seen.delivered, seen.deliveredSeq = ms, seq
            end
          end
        end
      end
    end
    streamsSeen[stream] = seen
  end
  if rec.ai then
    local ms, seq = idParts(rec.ai)
    return ms ~= nil and idAfter(ms, seq, seen.delivered, seen.deliveredSeq)
        and not idAfter(ms, seq, seen.last, seen.lastSeq)
  end
  local written = rec.tr or rec.t1
  return seen.last >= written and seen.delivered < written
end

-- Leases whose records are gone (evicted, deleted by hand: see dropGhost): their members, found
-- by one scan of the active zset after the leases are handled, leave it with their slots, and
-- their groups' queues move on (a GROUP_ROUND_ROBIN group waited for good behind one, a
-- probe). One scan a call, however many (a scan per lease was quadratic when an eviction took
-- a shard's records at once). A strict run's, CANCELLING, is in no zset: its slot cannot be
-- found (counted all the same, so the error line says so).
local goneRids, goneCount = {}, 0
local function dropGhostLeases()
  if goneCount == 0 then return end
  local found = 0
  local cursor = '0'
  repeat
    local got = rcall('ZSCAN', activeKey, cursor, 'COUNT', 1000)
    cursor = got[1]
    for j = 1, #got[2], 2 do
      local m = got[2][j]
      if goneRids[ridOf(m)] then
        dropGhost(m, activeKey)
        found = found + 1
        local head = liveQueued(groupOfMember(m), 1)[1]   -- (its record: the group's limits)
        if head then touch(loadRun(ridOf(head))) end
      end
    end
  until cursor == '0'
  ghosts = ghosts + goneCount - found   -- (the strict ones: see above)
end

-- (First, as it only frees: a server at its maxmemory refuses a script's first write that
-- may grow memory, and lets the rest of the script write once it wrote anything. The leases'
-- retries write an assignment first: with the records after them, a full server whose runs'
-- leases had lapsed, as they do when renewals are refused, kept every old record and stayed
-- full until an operator acted; a memory probe.)
-- Old records: whole entries of each workflow's ended stream, oldest first, up to the limit:
-- those past the retention, and more while the workflow keeps more than `cap` ended runs;
-- none that ended within `floor`. The first workflow looked at turns with the clock, so a
-- backlog in one cannot starve the others.
local old = {}
local index = rcall('HGETALL', endedKey)
local legacyLeft = rcall('EXISTS', legacyTerminalKey) == 1
local young = now - floor
local first = #index > 0 and (math.floor(now / 1000) % (#index / 2)) or 0
for k = 0, #index / 2 - 1 do
  if #old >= limit then break end
  local i = ((first + k) % (#index / 2)) * 2 + 1
  local w = index[i + 1]
  local stream = endedKey .. ':' .. index[i]
  local cut = math.min(now - (keepOf[w] or retention), young)
  local excess = 0
  if cap > 0 and not legacyLeft then
    local n = rcall('HMGET', countsKey, w .. '|S', w .. '|F', w .. '|C')
    excess = (tonumber(n[1]) or 0) + (tonumber(n[2]) or 0) + (tonumber(n[3]) or 0) - cap
  end
  local last, taken, more = nil, 0, true
  while more and #old < limit do
    local entries = rcall('XRANGE', stream, last and ('(' .. last) or '-', '+', 'COUNT', 16)
    more = #entries == 16
    for j = 1, #entries do
      local id, fields = entries[j][1], entries[j][2]
      local endedAt = tonumber(string.match(id, '^(%d+)'))
      if endedAt > young or (taken >= excess and endedAt > cut) then
        more = false
        break
      end
      for f = 2, #fields, 2 do
        for rid in string.gmatch(fields[f], '[^,]+') do
          old[#old + 1] = rid
          taken = taken + 1
        end
      end
      last = id
      if #old >= limit then break end
    end
  end
  if last then
    local ms, seq = string.match(last, '^(%d+)-(%d+)$')
    rcall('XTRIM', stream, 'MINID', ms .. '-' .. (tonumber(seq) + 1))
    if rcall('XLEN', stream) == 0 then
      rcall('DEL', stream)
      rcall('HDEL', endedKey, index[i])
    end
  end
end
local legacy = {}
if #old < limit then
  legacy = rcall('ZRANGEBYSCORE', legacyTerminalKey, '-inf', math.min(now - retention, young),
    'LIMIT', 0, limit - #old)
  for i = 1, #legacy do old[#old + 1] = legacy[i] end
end
for i = 1, #old, 1000 do
  local chunk = { unpack(old, i, math.min(i + 999, #old)) }
  local raws = rcall('HMGET', runsKey, unpack(chunk))
  for j = 1, #raws do
    if raws[j] then
      local rec = cmsgpack.unpack(raws[j])
      if rec.c == 1 then countRun(rec.w, rec.st, -1) end
    end
  end
  rcall('HDEL', runsKey, unpack(chunk))
  rcall('HDEL', inputsKey, unpack(chunk))
  rcall('HDEL', outputsKey, unpack(chunk))
end
flushCounts()
callChunked('ZREM', legacyTerminalKey, legacy, 1000)

local retried, failed, cancelled, reassigned = 0, 0, 0, 0
local expired = rcall('ZRANGEBYSCORE', leasesKey, '-inf', now, 'LIMIT', 0, limit)
for i = 1, #expired do
  local rid = expired[i]
  setLease(rid, false)
  local rec = loadRun(rid)
  if rec and rec.st == 'R' then
    if attemptsUsed(rec) < rec.m then
      noteEarlier(rec, 'lease_expired')
      rec.a = rec.a + 1
      assignRun(rid, rec)
      retried = retried + 1
    else
      endFailed(rid, rec, 'lease_expired')
      failed = failed + 1
    end
  elseif rec and rec.st == 'A' then
    local ra = rec.ra or 0
    local due = (rec.tr or rec.t1) + deadline * 2 ^ math.min(ra, 6)
    if now >= due then
      if waitsUnread(rid, rec) then
        -- (no record write.) Looked at again after about as long as it has waited: 1, 2, 4
        -- ... 64 deadlines. Every 1 to 4 deadlines kept a server busy with nothing coming in
        -- (a probe: 1,000,000 runs of a workflow no executor served, re-read every 30 s,
        -- 80% of a core); a consumer that starts reads the entries itself, the reaper's
        -- fresh entry only covers one delivered and never claimed, or lost.
        local step, waited = deadline, now - (rec.tr or rec.t1)
        while step < 64 * deadline and step * 2 <= waited do step = step * 2 end
        due = now + step
      else
        writeAssignment(rid, rec)
        rec.tr = now
        rec.ra = ra + 1
        saveRun(rid, rec)
        due = now + deadline * 2 ^ math.min(ra + 1, 6)
        reassigned = reassigned + 1
      end
    end
    setLease(rid, due)
  elseif rec and rec.st == 'X' then
    endCancelling(rid, rec)
    cancelled = cancelled + 1
  elseif not rec then
    goneRids[rid] = true
    goneCount = goneCount + 1
  end
end
dropGhostLeases()

refillTouched()
flushRuns()
flushNewest()

-- Groups: those idle past the retention; more, the least recently admitting first, while the
-- shard remembers more than maxGroups (none that admitted within the floor). A live one (a run
-- holding a slot, a debounce window open) is kept and counts as admitting now.
local idle = overdue(newestAtKey, now, retention, maxGroups, floor, limit)
local forget, live = {}, {}
if #idle > 0 then
  local slots = rcall('HMGET', slotsKey, unpack(idle))
  local windows = rcall('HMGET', debounceKey, unpack(idle))
  for i = 1, #idle do
    if (tonumber(slots[i]) or 0) > 0 or windows[i] then
      live[#live + 1] = now
      live[#live + 1] = idle[i]
    else
      forget[#forget + 1] = idle[i]
    end
  end
end
if #forget > 0 then
  rcall('HDEL', newestKey, unpack(forget))
  rcall('HDEL', fencesKey, unpack(forget))
  local lasts = {}   -- (a debounced group's last run let through, with its fence)
  for i = 1, #forget do lasts[i] = forget[i] .. '|last' end
  rcall('HDEL', fencesKey, unpack(lasts))
  rcall('ZREM', newestAtKey, unpack(forget))
end
callChunked('ZADD', newestAtKey, live, 1000)
local out = withFailed({ 0, retried, failed, cancelled, #old, stats.assigned, reassigned,
                         #forget, #expired, ghosts })
if token ~= '' and KEYS[17] and retried + failed + cancelled > 0 then
  rcall('SET', KEYS[17], token .. '|' .. cmsgpack.pack(out), 'PX', 600000)
end
return out
