--[[
  An executor reads new assignments and claims them in one call: XREADGROUP (never blocking)
  over its assignment streams, in the order given, until it has read as many entries as it
  has free slots; then what claim.lua does with the entries read. Wide reads (a scan): the
  streams are read in batches of at most `want - read so far` streams, `(want - read so far)
  // batch` entries from each (at least one free slot per stream: one read over every stream).
  Deep reads (the streams the executor found with a backlog): one stream after the other, each
  asked for all that is still wanted, so a backlog fills the call from as few shards as it can
  (the claim costs a fixed part per shard: one HMGET, HSET, ZADD and HMGET each, and the
  executor's finish call of those runs pays its own per shard again). It spares the
  executor a round trip per read, and its reply carries each claimed run's fields, not the
  entries. Only on one server: the streams of several shards are read at once (on a cluster an
  executor reads, then claims per shard).

  Input:
    KEYS[1..]  4 keys per shard, for the S shards of the call (ARGV[5]), then the streams:
      KEYS[4(b-1) + 1..4]  shard b's runs hash, inputs hash, leases zset, counts hash
      KEYS[4S + n]         assignment stream n, read with '>' (new entries only)
    ARGV[1]  now in ms, or 0 for the server clock
    ARGV[2]  consumer group of the assignments streams
    ARGV[3]  executor id (the consumer)
    ARGV[4]  lease length in ms
    ARGV[5]  S, the number of shards of the call
    ARGV[6]  want: entries to read in all at most (the executor's free slots)
    ARGV[7]  '1': deep reads, '0': wide reads
    ARGV[8..] for each stream n, in the order to read them: the shard b it belongs to

  Output:
    {0, claims, reads, malformed, reached, unrung}
      claims: one item per well-formed entry read, in the order read:
        {1, run id, attempt, workflow, version, input, key, sequence, tp, hq, b, entry id}
          claimed (hq as in claim.lua)
        {0, run id, state}   refused (cancelled, re-assigned or gone: state '' when gone)
      reads: {n, entries read, last entry id, entries asked} for each read of a stream that
        gave entries (read = asked: the stream likely has more), a stream once per round
        (entries of runs that cannot be claimed take no slot: see STALE_MAX)
      malformed: {n, entry id} for each entry that is not an assignment (acknowledged, so
        it cannot come back through XAUTOCLAIM; the caller logs it)
      reached: how many streams, the first ones of the order, were read (the rest were not
        needed)
      unrung: how many assignments read lack r = '1' (their writer rang no bell)
    {-4, 0}  bad ARGV; nothing read

  Writes: XREADGROUP's effects (the entries become pending for the executor), then XACK of
  every entry read; the claimed runs' records (RUNNING, the executor), leases and counts;
  nothing to streams.
]]
local rcall = redis.call

-- @include now
-- @include claim

local now, nowUs = nowMs(ARGV[1])
local groupName, executor, leaseMs = ARGV[2], ARGV[3], tonumber(ARGV[4])
local shards, want, deep = tonumber(ARGV[5]), tonumber(ARGV[6]), ARGV[7] == '1'
local streamBase = 4 * (shards or 0)
local streams = #ARGV - 7
if not leaseMs or leaseMs <= 0 or not shards or shards < 1 or not want or want < 1
    or (ARGV[7] ~= '1' and ARGV[7] ~= '0') or streams < 1 or #KEYS ~= streamBase + streams then
  return { -4, 0 }
end
local numberOf = {}
for n = 1, streams do
  local b = tonumber(ARGV[7 + n])
  if not b or b < 1 or b > shards or b ~= math.floor(b) then return { -4, 0 } end
  numberOf[KEYS[streamBase + n]] = n
end

-- An entry whose run cannot be claimed (superseded or cancelled since it was assigned, or
-- assigned again) takes no slot: the call reads on, in rounds, from the streams whose last read
-- gave all it asked for, until `want` runs were claimed, it read STALE_MAX entries beyond
-- `want`, or it made MAX_ROUNDS rounds (a round costs a few µs per entry and per stream; 1,000
-- rounds of one entry held the server 15 ms). (Counted as a slot, a key's superseded
-- assignments piled up behind a busy pool were read one per free slot: 16,000 of them kept
-- its newest runs waiting for many minutes.)
local STALE_MAX, MAX_ROUNDS = 256, 32
local reads, malformed, unrung, claims = {}, {}, 0, {}
local order = {}
for n = 1, streams do order[n] = n end
local claimedN, readN, reached, rounds = 0, 0, nil, 0
while #order > 0 and claimedN < want and readN < want + STALE_MAX and rounds < MAX_ROUNDS do
  rounds = rounds + 1
  local q, full = {}, {}
  local got, first, wanted = 0, 1, want - claimedN
  while first <= #order and got < wanted do
    local need = wanted - got
    local last = deep and first or math.min(first + need - 1, #order)
    local count = math.floor(need / (last - first + 1))
    local args = { 'GROUP', groupName, executor, 'COUNT', count, 'STREAMS' }
    for k = first, last do args[#args + 1] = KEYS[streamBase + order[k]] end
    for _ = first, last do args[#args + 1] = '>' end
    first = last + 1
    for _, item in ipairs(rcall('XREADGROUP', unpack(args)) or {}) do
      local n = numberOf[item[1]]
      local entries = item[2]
      local b = ARGV[7 + n]
      for _, entry in ipairs(entries) do
        local rid, attempt, rung
        local fields = entry[2]
        for k = 1, #fields, 2 do
          if fields[k] == 'id' then rid = fields[k + 1]
          elseif fields[k] == 'a' then attempt = tonumber(fields[k + 1])
          elseif fields[k] == 'r' then rung = fields[k + 1] == '1' end
        end
        if rid and rid ~= '' and attempt and attempt == math.floor(attempt) then
          if not rung then unrung = unrung + 1 end
          q[#q + 1] = entry[1]
          q[#q + 1] = rid
          q[#q + 1] = attempt
          q[#q + 1] = n
          q[#q + 1] = b
          got = got + 1
        else
          rcall('XACK', KEYS[streamBase + n], groupName, entry[1])
          malformed[#malformed + 1] = { n, entry[1] }
        end
      end
      readN = readN + #entries
      if #entries > 0 then reads[#reads + 1] = { n, #entries, entries[#entries][1], count } end
      if #entries >= count then full[#full + 1] = n end
    end
  end
  reached = reached or first - 1   -- (of the order given: the later rounds re-read those)
  local round = claimEntries(q, 1, streamBase, groupName, executor, leaseMs, now, nowUs, nowUs)
  for j = 2, #round do
    local item = round[j]
    if item[1] == 1 then
      claimedN = claimedN + 1
      item[#item + 1] = tonumber(q[5 * (j - 2) + 5])
      item[#item + 1] = q[5 * (j - 2) + 1]
    end
    claims[#claims + 1] = item
  end
  order = full
end
return { 0, claims, reads, malformed, reached or 0, unrung }
