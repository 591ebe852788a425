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
      {1, run id, attempt, workflow, version, input, key, sequence, tp, hq}   claimed
        (tp: the run's trace context, '' when it has none; hq: 1 on the first start since
        a draining executor handed the run back, else 0)
      {0, run id, state}   refused: state is the run's state letter, or '' when it is gone
    {-4, i}  quintuple i is malformed (attempt, stream or shard number); nothing written

  Writes: nothing to streams.
]]
local rcall = redis.call

-- @include now
-- @include claim

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

return claimEntries(ARGV, 7, streamBase, groupName, executor, leaseMs, now, nowUs, readUs)
