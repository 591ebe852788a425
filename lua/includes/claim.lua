--[[
  claimEntries(q, first, streamBase, groupName, executor, leaseMs, now, nowUs, readUs):
  claims the runs of the quintuples q[first..] (entry id, run id, attempt, stream number n,
  shard b; validated by the caller): an ASSIGNED run of that attempt becomes RUNNING under the
  executor's lease. KEYS as claim.lua's: 4 per shard, then the streams (KEYS[streamBase + n]),
  whose entries are all acknowledged, claimed or not. Returns {0, item, ...} as claim.lua does.
]]
local function claimEntries(q, first, streamBase, groupName, executor, leaseMs, now,
                            nowUs, readUs)
  -- Per shard: one HMGET of the records, one HSET of the claimed ones, one ZADD of their leases
  -- and one HMGET of the inputs not kept in the record (each redis.call from Lua costs about as
  -- much as its command).
  -- (Not the record helpers of includes/runs.lua, which every other script uses: their general
  -- bookkeeping cost the claim 2 µs per run end to end, 4% of a run's server CPU.)
  local items = {}   -- shard -> positions (index of the quintuple in q)
  for i = first, #q, 5 do
    local b = tonumber(q[i + 4])
    local list = items[b]
    if not list then list = {}; items[b] = list end
    list[#list + 1] = i
  end

  local out = { 0 }
  local acks = {}   -- stream number -> entry ids
  for b, list in pairs(items) do
    local o = 4 * (b - 1)
    local rids = {}
    for j = 1, #list do rids[j] = q[list[j] + 1] end
    local raws = {}
    for j = 1, #rids, 1000 do
      local got = rcall('HMGET', KEYS[o + 1], unpack(rids, j, math.min(j + 999, #rids)))
      for k = 1, #got do raws[j + k - 1] = got[k] end
    end
    local writes, leases, claimed, recs, claimedOf, handedBack = {}, {}, {}, {}, {}, {}
    for j = 1, #list do
      local i, rid = list[j], rids[j]
      local rec = raws[j] and cmsgpack.unpack(raws[j])
      if rec and rec.st == 'A' and rec.a == tonumber(q[i + 2]) and not recs[rid] then
        rec.st = 'R'
        rec.e = executor
        -- this attempt's points of the path, in µs after the inbox entry (see runs.lua)
        local inboxUs = tonumber(string.sub(rec.s, 1, 16), 16) * 1000
        rec.pe = readUs > 0 and readUs - inboxUs or nil
        rec.pc = nowUs - inboxUs
        rec.ph, rec.t2, rec.er, rec.hs = nil, nil, nil, nil   -- (and an earlier version's)
        rec.ai = nil   -- (its assignment entry's id: read by the reaper until the claim)
        handedBack[rid] = rec.hq   -- (the first start since a drain handed it back: told once)
        rec.hq = nil
        writes[#writes + 1] = rid
        writes[#writes + 1] = cmsgpack.pack(rec)
        leases[#leases + 1] = now + leaseMs
        leases[#leases + 1] = rid
        claimed[#claimed + 1] = j
        recs[rid] = rec
        if rec.c == 1 then claimedOf[rec.w] = (claimedOf[rec.w] or 0) + 1 end
      else
        out[(i - first) / 5 + 2] = { 0, rid, rec and (recs[rid] and 'R' or rec.st) or '' }
      end
      local n = tonumber(q[i + 3])
      local ids = acks[n]
      if not ids then ids = {}; acks[n] = ids end
      ids[#ids + 1] = q[i]
    end
    for j = 1, #writes, 1000 do
      rcall('HSET', KEYS[o + 1], unpack(writes, j, math.min(j + 999, #writes)))
      rcall('ZADD', KEYS[o + 3], unpack(leases, j, math.min(j + 999, #leases)))
    end
    -- (an input of more than INLINE_INPUT_BYTES, or one admitted before inputs lived in the
    -- record, is in the inputs hash)
    local stored, inputs = {}, {}
    for j = 1, #claimed do
      local rid = rids[claimed[j]]
      if recs[rid]['in'] == nil then stored[#stored + 1] = rid end
    end
    for j = 1, #stored, 1000 do
      local part = { unpack(stored, j, math.min(j + 999, #stored)) }
      local got = rcall('HMGET', KEYS[o + 2], unpack(part))
      for k = 1, #part do inputs[part[k]] = got[k] end
    end
    for j = 1, #claimed do
      local rid = rids[claimed[j]]
      local rec = recs[rid]
      out[(list[claimed[j]] - first) / 5 + 2] = {
        1, rid, rec.a, rec.w, rec.v, rec['in'] or inputs[rid] or '', rec.k or rec.ev, rec.s,
        rec.tp or '', handedBack[rid] or 0,
      }
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
end
