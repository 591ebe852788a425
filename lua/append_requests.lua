--[[
  Appends run requests to a shard's requests stream, at most once per run id within the
  de-duplication window: ingress calls it before acknowledging the inbox entries, so an event
  redelivered after a crash, or republished with the same id, appends nothing the second time.
  Ids seen longer ago than the window are forgotten.

  Input:
    KEYS[1]  requests stream
    KEYS[2]  seen zset          run id by the time it was requested (ms)
    ARGV[1]  now in ms, or 0 for the server clock
    ARGV[2]  de-duplication window in ms
    ARGV[3]  msgpack array: run id, packed run request, run id, packed run request, ...
             (one argument: encoding thousands of arguments costs the client more than the
             server spends unpacking them)

  Output:
    {0, appended, duplicates, flag, ...}  one flag per pair: 1 appended, 0 duplicate
    {-4, 0}  bad ARGV; nothing written

  Writes: XADD requests {r = packed request}.
]]
local rcall = redis.call
local requestsKey, seenKey = KEYS[1], KEYS[2]

-- @include now

local now = nowMs(ARGV[1])
local window = tonumber(ARGV[2])
if not window then return { -4, 0 } end
local ok, items = pcall(cmsgpack.unpack, ARGV[3] or '')
if not ok or type(items) ~= 'table' or #items % 2 ~= 0 then return { -4, 0 } end

rcall('ZREMRANGEBYSCORE', seenKey, '-inf', now - window)
local out = { 0, 0, 0 }
for i = 1, #items, 2 do
  if rcall('ZADD', seenKey, 'NX', now, items[i]) == 1 then
    rcall('XADD', requestsKey, '*', 'r', items[i + 1])
    out[2] = out[2] + 1
    out[#out + 1] = 1
  else
    out[3] = out[3] + 1
    out[#out + 1] = 0
  end
end
return out
