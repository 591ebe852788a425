#!lua flags=allow-oom
--[[
  Renews the leases of an executor's runs and tells it which of them it must stop: runs that
  were cancelled (CANCELLING), ended, re-assigned to another attempt or executor, or are gone.
  This is the backstop for a cancel message the executor missed on the control stream.

  Flags: allow-oom. A renewal moves scores of members the leases zset holds: it takes no
  memory to speak of, and a server at its maxmemory (noeviction) must not let leases lapse
  (refused, they did: the reaper retried each run, its retry could not renew either, and a
  lease later the next attempt went, until runs FAILED of lease_expired; a probe). Declares
  every key it touches (KEYS[1], KEYS[2]: one shard's slot), as a script with flags must.

  Input:
    KEYS[1]  runs hash
    KEYS[2]  leases zset
    ARGV[1]  now in ms, or 0 for the server clock
    ARGV[2]  executor id
    ARGV[3]  lease length in ms
    ARGV[4..] pairs: run id, attempt

  Output:
    {0, run id, ...}  the run ids to stop (a CANCELLING run's lease is still renewed, so a
                      strict-mode slot stays held while its handler winds down)
    {-4, i}           pair i is malformed; nothing written

  Writes: nothing to streams.
]]
local rcall = redis.call
local runsKey, leasesKey = KEYS[1], KEYS[2]

-- @include now

local now = nowMs(ARGV[1])
local executor, leaseMs = ARGV[2], tonumber(ARGV[3])
if not leaseMs or leaseMs <= 0 or (#ARGV - 3) % 2 ~= 0 then return { -4, 0 } end
for i = 4, #ARGV, 2 do
  if not tonumber(ARGV[i + 1]) then return { -4, (i - 2) / 2 } end
end

-- One HMGET of the records and one ZADD of the renewed leases per call (a redis.call per run
-- cost the server twice as much: the beat renews every active run each sixth of a lease).
local rids = {}
for i = 4, #ARGV, 2 do rids[#rids + 1] = ARGV[i] end
local raws = {}
for j = 1, #rids, 1000 do
  local got = rcall('HMGET', runsKey, unpack(rids, j, math.min(j + 999, #rids)))
  for k = 1, #got do raws[j + k - 1] = got[k] end
end
local out, leases = { 0 }, {}
for j = 1, #rids do
  local rid, att = rids[j], tonumber(ARGV[3 + 2 * j])
  local rec = raws[j] and cmsgpack.unpack(raws[j])
  local mine = rec and rec.a == att and rec.e == executor
  if mine and (rec.st == 'R' or rec.st == 'X') then
    leases[#leases + 1] = now + leaseMs
    leases[#leases + 1] = rid
  end
  if not (mine and rec.st == 'R') then out[#out + 1] = rid end
end
for j = 1, #leases, 1000 do
  rcall('ZADD', leasesKey, unpack(leases, j, math.min(j + 999, #leases)))
end
return out
