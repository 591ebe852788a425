--[[
  An executor takes ASSIGNED runs: each becomes RUNNING under a lease. A run that was
  cancelled, re-assigned with another attempt, or is gone is refused and must not start.
  Every assignment entry of the batch is acknowledged, claimed or not. One call serves one
  shard, or several shards of one server (on a cluster, one: each shard has its own slot).

  Input:
    KEYS[1..]  4 keys per shard, for the S shards of the call (ARGV[6]), then the streams:
      KEYS[4(b-1) + 1]  shard b's runs hash
      KEYS[4(b-1) + 2]  shard b's inputs hash
      KEYS[4(b-1) + 3]  shard b's leases zset
      KEYS[4(b-1) + 4]  shard b's counts hash   '<workflow>|<state>' -> runs in that state
      KEYS[4S + n]      assignment stream n the entries were read from (XACKed), one or more
    ARGV[1]  now in ms, or 0 for the server clock
    ARGV[2]  consumer group of the assignments stream
    ARGV[3]  executor id
    ARGV[4]  lease length in ms
    ARGV[5]  when the executor read the assignments (µs, its clock), or 0 when unknown
    ARGV[6]  S, the number of shards of the call
    ARGV[7..] quintuples: assignments entry id, run id, attempt, stream number n, shard b
              (the stream must belong to the shard)

  Output:
    {0, item, ...}, one item per quintuple, in order:
      {1, run id, attempt, workflow, version, input, key, sequence, tp}   claimed
        (tp: the run's trace context, '' when it has none)
      {0, run id, state}   refused: state is the run's state letter, or '' when it is gone
    {-4, i}  quintuple i is malformed (attempt, stream or shard number); nothing written

  Writes: nothing to streams.
]]
local rcall = redis.call

-- @include now

local now, nowUs = nowMs(ARGV[1])
local groupName, executor, leaseMs = ARGV[2], ARGV[3], tonumber(ARGV[4])
local readUs, shards = tonumber(ARGV[5]), tonumber(ARGV[6])
if not leaseMs or leaseMs <= 0 or not readUs or not shards or shards < 1
    or #KEYS <= 4 * shards or (#ARGV - 6) % 5 ~= 0 then
  return { -4, 0 }
end
local streamBase = 4 * shards
for i = 7, #ARGV, 5 do
  local a, n, b = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3]), tonumber(ARGV[i + 4])
  if not a or a ~= math.floor(a) or ARGV[i + 1] == '' or not n or n < 1
      or not KEYS[streamBase + n] or not b or b < 1 or b > shards or b ~= math.floor(b) then
    return { -4, (i - 2) / 5 }
  end
end

-- Per shard: one HMGET of the records, one HSET of the claimed ones, one ZADD of their leases
-- and one HMGET of their inputs (each redis.call from Lua costs about as much as its command).
-- (Not the record helpers of includes/runs.lua, which every other script uses: their general
-- bookkeeping cost the claim 2 µs per run end to end, 4% of a run's server CPU.)
local items = {}   -- shard -> positions (ARGV index of the quintuple)
for i = 7, #ARGV, 5 do
  local b = tonumber(ARGV[i + 4])
  local list = items[b]
  if not list then list = {}; items[b] = list end
  list[#list + 1] = i
end

local out = { 0 }
local acks = {}   -- stream number -> entry ids
for b, list in pairs(items) do
  local o = 4 * (b - 1)
  local rids = {}
  for j = 1, #list do rids[j] = ARGV[list[j] + 1] end
  local raws = {}
  for j = 1, #rids, 1000 do
    local got = rcall('HMGET', KEYS[o + 1], unpack(rids, j, math.min(j + 999, #rids)))
    for k = 1, #got do raws[j + k - 1] = got[k] end
  end
  local writes, leases, claimed, recs, claimedOf = {}, {}, {}, {}, {}
  for j = 1, #list do
    local i, rid = list[j], rids[j]
    local rec = raws[j] and cmsgpack.unpack(raws[j])
    if rec and rec.st == 'A' and rec.a == tonumber(ARGV[i + 2]) and not recs[rid] then
      rec.st = 'R'
      rec.e = executor
      -- this attempt's points of the path, in µs after the inbox entry (see runs.lua)
      local inboxUs = tonumber(string.sub(rec.s, 1, 16), 16) * 1000
      rec.pe = readUs > 0 and readUs - inboxUs or nil
      rec.pc = nowUs - inboxUs
      rec.ph, rec.t2, rec.er, rec.hs = nil, nil, nil, nil   -- (and an earlier version's)
      writes[#writes + 1] = rid
      writes[#writes + 1] = cmsgpack.pack(rec)
      leases[#leases + 1] = now + leaseMs
      leases[#leases + 1] = rid
      claimed[#claimed + 1] = j
      recs[rid] = rec
      if rec.c == 1 then claimedOf[rec.w] = (claimedOf[rec.w] or 0) + 1 end
    else
      out[(i - 2) / 5 + 1] = { 0, rid, rec and (recs[rid] and 'R' or rec.st) or '' }
    end
    local n = tonumber(ARGV[i + 3])
    local ids = acks[n]
    if not ids then ids = {}; acks[n] = ids end
    ids[#ids + 1] = ARGV[i]
  end
  for j = 1, #writes, 1000 do
    rcall('HSET', KEYS[o + 1], unpack(writes, j, math.min(j + 999, #writes)))
    rcall('ZADD', KEYS[o + 3], unpack(leases, j, math.min(j + 999, #leases)))
  end
  for j = 1, #claimed, 1000 do
    local part = {}
    for k = j, math.min(j + 999, #claimed) do part[#part + 1] = rids[claimed[k]] end
    local inputs = rcall('HMGET', KEYS[o + 2], unpack(part))
    for k = 1, #part do
      local i = list[claimed[j + k - 1]]
      local rec = recs[part[k]]
      out[(i - 2) / 5 + 1] = {
        1, part[k], rec.a, rec.w, rec.v, inputs[k] or '', rec.k or rec.ev, rec.s,
        rec.tp or '',
      }
    end
  end
  local countsKey = KEYS[o + 4]
  for w, count in pairs(claimedOf) do
    if rcall('HINCRBY', countsKey, w .. '|A', -count) <= 0 then
      rcall('HDEL', countsKey, w .. '|A')
    end
    rcall('HINCRBY', countsKey, w .. '|R', count)
  end
end
for n, ids in pairs(acks) do
  for j = 1, #ids, 1000 do
    rcall('XACK', KEYS[streamBase + n], groupName, unpack(ids, j, math.min(j + 999, #ids)))
  end
end
return out
