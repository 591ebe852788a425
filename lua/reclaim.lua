--[[
  An executor whose claim call failed (the server carried it out, but the reply never came:
  a server frozen mid-call, a connection cut) takes back the runs that call claimed for it:
  RUNNING (or CANCELLING since) under this executor, claimed at or after the call was sent, and not among the
  attempts the executor holds or started (an older attempt of the run hides none: the reaper
  may have retried it while its result waited; one it started is never started again, though
  it holds it no more: its result given up after a lease, as its master froze). Without it they sat RUNNING, never started,
  for a whole lease, and then
  used an attempt (a run of one attempt FAILED unrun). Their leases are renewed from now.

  Input:
    KEYS[1]  runs hash
    KEYS[2]  inputs hash
    KEYS[3]  leases zset
    ARGV[1]  now in ms, or 0 for the server clock
    ARGV[2]  executor id
    ARGV[3]  lease length in ms
    ARGV[4]  the claim call was sent at or after this ms (the server's clock: the caller
             subtracts its clock skew allowance)
    ARGV[5]  at most this many leases are looked at (those set since ARGV[4] + lease)
    ARGV[6..] pairs: run id, attempt, of the attempts the executor holds (running, or
              reported and not yet confirmed) or started since the call, less its skew (a run
              may come twice, in two attempts); a newer attempt of such a run is taken back

  Output:
    {0, item, ...}  one item per run taken back, as claim.lua's claimed ones, with its state:
      {1, run id, attempt, workflow, version, input, key, sequence, tp, 0, state}
      (state 'X': it was cancelled since: the executor starts and stops it, so that its
      outcome is reported and a strict slot freed, rather than left to its lease)
    {-4, 0}  bad ARGV; nothing written

  Writes: the leases of the runs taken back (ZADD); nothing to streams.
]]
local rcall = redis.call
local runsKey, inputsKey, leasesKey = KEYS[1], KEYS[2], KEYS[3]

-- @include now

local now = nowMs(ARGV[1])
local executor, leaseMs = ARGV[2], tonumber(ARGV[3])
local since, cap = tonumber(ARGV[4]), tonumber(ARGV[5])
if not leaseMs or leaseMs <= 0 or not since or not cap or cap < 1 or executor == ''
    or (#ARGV - 5) % 2 ~= 0 then
  return { -4, 0 }
end
local held = {}
for i = 6, #ARGV, 2 do held[ARGV[i] .. '/' .. tonumber(ARGV[i + 1])] = true end

-- A lease set by a claim at or after `since` runs out at `since + lease` or later (renewals
-- only move it on), so the runs to look at are those leased until then or later.
local out, renew, found = { 0 }, {}, {}
local looked = 0
while looked < cap do
  local rids = rcall('ZRANGEBYSCORE', leasesKey, since + leaseMs, '+inf', 'LIMIT', looked,
                     math.min(1000, cap - looked))
  if #rids == 0 then break end
  looked = looked + #rids
  local raws = rcall('HMGET', runsKey, unpack(rids))
  for j = 1, #rids do
    local rid = rids[j]
    local rec = raws[j] and cmsgpack.unpack(raws[j])
    if rec and (rec.st == 'R' or rec.st == 'X') and rec.e == executor
        and not held[rid .. '/' .. rec.a] and rec.pc then
      local claimedMs = tonumber(string.sub(rec.s, 1, 16), 16) + rec.pc / 1000
      if claimedMs >= since then found[#found + 1] = { rid, rec } end
    end
  end
end
for _, f in ipairs(found) do
  local rid, rec = f[1], f[2]
  local body = rec['in'] or rcall('HGET', inputsKey, rid) or ''
  out[#out + 1] = { 1, rid, rec.a, rec.w, rec.v, body, rec.k or rec.ev, rec.s, rec.tp or '', 0,
                    rec.st }
  renew[#renew + 1] = now + leaseMs
  renew[#renew + 1] = rid
end
if #renew > 0 then rcall('ZADD', leasesKey, unpack(renew)) end
return out
