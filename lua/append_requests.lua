--[[
  Appends run requests to a shard's requests stream, all in one call. It does not
  de-duplicate: an event redelivered after an ingress crash appends its requests again, and
  admission finds their runs already recorded (a run record lives until its workflow's
  retention after it ended, so records are the de-duplication memory).

  Input:
    KEYS[1]  requests stream
    ARGV[1]  msgpack array of packed run requests (one argument: encoding thousands of
             arguments costs the client more than the server spends unpacking them)

  Output:
    {0, appended}
    {-4, 0}  bad ARGV; nothing written

  Writes: XADD requests {r = packed request, t = when it was written, µs (server clock): a point
  of the run's path}.
]]
local rcall = redis.call
local requestsKey = KEYS[1]

local ok, items = pcall(cmsgpack.unpack, ARGV[1] or '')
if not ok or type(items) ~= 'table' then return { -4, 0 } end

local t = rcall('TIME')
local written = t[1] .. string.format('%06d', tonumber(t[2]))
for i = 1, #items do
  rcall('XADD', requestsKey, '*', 'r', items[i], 't', written)
end
return { 0, #items }
