--[[
  Retires a workflow: removes its definition from the registry, so ingress routes its events
  nowhere once it reloads (it does when the epoch changes). Its versions and retention stay:
  a version names one definition for good, and its ended runs are still reaped by its
  retention. (`supersede retire` then cancels its live runs and deletes its assignment
  streams, shard by shard.)

  Input:
    KEYS[1]  workflows hash     workflow id -> JSON definition
    KEYS[2]  registry epoch     counter (string)
    KEYS[3]  served hash        workflow id -> ms an executor serving it last said so (each
                                second; the server's clock, as the executor last read it)
    ARGV[1]  workflow id
    ARGV[2]  ms: refuse when an executor said it serves the workflow within this long of the
             server's now (0: retire anyway)

  Output:
    {0, 1}          removed (the epoch was bumped), and its served mark
    {0, 0}          not registered; nothing written
    {0, -1, ms}     refused: an executor said it serves it ms ago; nothing written
    {-4, 0}         bad ARGV; nothing written

  Writes: no stream.
]]
local rcall = redis.call
local workflowsKey, epochKey, servedKey = KEYS[1], KEYS[2], KEYS[3]
local wid, window = ARGV[1], tonumber(ARGV[2])
if not wid or wid == '' or not window or window < 0 then return { -4, 0 } end
if not rcall('HGET', workflowsKey, wid) then return { 0, 0 } end
local served = tonumber(rcall('HGET', servedKey, wid) or '')
if window > 0 and served then
  local t = rcall('TIME')
  local ago = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000) - served
  if ago < window then return { 0, -1, ago } end
end
-- The epoch first: a user refused a command here (Redis does not roll a script back) has
-- changed nothing yet.
rcall('INCR', epochKey)
rcall('HDEL', workflowsKey, wid)
rcall('HDEL', servedKey, wid)
return { 0, 1 }
