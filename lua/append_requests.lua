--[[
  Appends run requests to a shard's requests stream, all in one entry. It does not
  de-duplicate: an event redelivered after an ingress crash appends its requests again, and
  admission finds their runs already recorded (a run record lives until its workflow's
  retention after it ended, so records are the de-duplication memory).

  Input:
    KEYS[1]  requests stream
    ARGV[1]  msgpack array of packed run requests (one argument: encoding thousands of
             arguments costs the client more than the server spends unpacking them)
    ARGV[2]  how many requests ARGV[1] holds

  Output:
    {0, appended}
    {-4, 0}  bad ARGV; nothing written

  Writes: one entry, XADD requests {rs = ARGV[1] as it is, t = when it was written, µs (server
  clock): a point of each run's path}; nothing for an empty array. One entry per call, not
  per request: admission reads and acknowledges a call's requests at once, and the server
  spends a few µs per request less (an XADD, its read and its XACK). The array is not
  unpacked here: admission dead-letters an entry that is no array of requests.
]]
local rcall = redis.call
local requestsKey = KEYS[1]
local n = tonumber(ARGV[2])
if not ARGV[1] or not n or n < 0 or n ~= math.floor(n) then return { -4, 0 } end
if n == 0 then return { 0, 0 } end

local t = rcall('TIME')
rcall('XADD', requestsKey, '*', 'rs', ARGV[1], 't', t[1] .. string.format('%06d', tonumber(t[2])))
return { 0, n }
