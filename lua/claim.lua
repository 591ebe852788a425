--[[
  An executor takes ASSIGNED runs: each becomes RUNNING under a lease. A run that was
  cancelled, re-assigned with another attempt, or is gone is refused and must not start.
  Every assignment entry of the batch is acknowledged, claimed or not.

  Input:
    KEYS[1]  runs hash
    KEYS[2]  inputs hash
    KEYS[3]  leases zset
    KEYS[4]  counts hash   '<workflow>|<state>' -> runs in that state
    KEYS[5..] assignment streams the entries were read from (XACKed), one or more
    ARGV[1]  now in ms, or 0 for the server clock
    ARGV[2]  consumer group of the assignments stream
    ARGV[3]  executor id
    ARGV[4]  lease length in ms
    ARGV[5]  when the executor read the assignments (ms, its clock), or 0 when unknown
    ARGV[6..] quadruples: assignments entry id, run id, attempt, stream number n (KEYS[4 + n])

  Output:
    {0, item, ...}, one item per quadruple, in order:
      {1, run id, attempt, workflow, version, input, key, sequence}   claimed
      {0, run id, state}   refused: state is the run's state letter, or '' when it is gone
    {-4, i}  quadruple i is malformed (attempt or stream number); nothing written

  Writes: nothing to streams.
]]
local rcall = redis.call
local runsKey, inputsKey, leasesKey, countsKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

-- @include now

local now = nowMs(ARGV[1])
local groupName, executor, leaseMs = ARGV[2], ARGV[3], tonumber(ARGV[4])
local readMs = tonumber(ARGV[5])
if not leaseMs or leaseMs <= 0 or not readMs or (#ARGV - 5) % 4 ~= 0 then return { -4, 0 } end
for i = 6, #ARGV, 4 do
  local a, n = tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  if not a or a ~= math.floor(a) or ARGV[i + 1] == '' or not n or not KEYS[4 + n] or n < 1 then
    return { -4, (i - 2) / 4 }
  end
end

local out = { 0 }
local acks = {}   -- stream number -> entry ids
local claimedOf = {}   -- workflow -> runs claimed (ASSIGNED -> RUNNING)
for i = 6, #ARGV, 4 do
  local rid, att, n = ARGV[i + 1], tonumber(ARGV[i + 2]), tonumber(ARGV[i + 3])
  local raw = rcall('HGET', runsKey, rid)
  local rec = raw and cmsgpack.unpack(raw)
  if rec and rec.st == 'A' and rec.a == att then
    rec.st = 'R'
    rec.e = executor
    rec.t2 = now
    rec.er, rec.hs = nil, nil   -- this attempt's hop times, not an earlier attempt's
    if readMs > 0 then rec.er = readMs - tonumber(string.sub(rec.s, 1, 16), 16) end
    rcall('HSET', runsKey, rid, cmsgpack.pack(rec))
    rcall('ZADD', leasesKey, now + leaseMs, rid)
    if rec.c == 1 then claimedOf[rec.w] = (claimedOf[rec.w] or 0) + 1 end
    out[#out + 1] = { 1, rid, att, rec.w, rec.v, rcall('HGET', inputsKey, rid) or '', rec.k, rec.s }
  else
    out[#out + 1] = { 0, rid, rec and rec.st or '' }
  end
  local ids = acks[n]
  if not ids then ids = {}; acks[n] = ids end
  ids[#ids + 1] = ARGV[i]
end
for n, ids in pairs(acks) do
  for j = 1, #ids, 1000 do
    rcall('XACK', KEYS[4 + n], groupName, unpack(ids, j, math.min(j + 999, #ids)))
  end
end
for w, count in pairs(claimedOf) do
  if rcall('HINCRBY', countsKey, w .. '|A', -count) <= 0 then
    rcall('HDEL', countsKey, w .. '|A')
  end
  rcall('HINCRBY', countsKey, w .. '|R', count)
end
return out
