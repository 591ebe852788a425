--[[
  Sets a value guarded by a fencing token (supersede.fencing.set_if_newer): the write happens
  only when the key holds no newer token, so a superseded run that writes late cannot overwrite
  what a newer run of its key wrote. The same token may write again (a retry of the same run).

  Input:
    KEYS[1]  the guarded key, a hash {value, fence} (created here)
    ARGV[1]  the value
    ARGV[2]  the writer's fence (ctx.fence) in 39 decimal digits, zero-padded, so that string
             order is number order
    ARGV[3]  time to live of the key in ms, or 0 to keep it

  Output:
    {1, fence}  written (fence: the one now stored)
    {0, fence}  refused: the stored fence is newer
    {-4, 0}     bad ARGV; nothing written

  Writes: nothing to streams.
]]
local key, value, fence, ttl = KEYS[1], ARGV[1], ARGV[2], tonumber(ARGV[3])
if not value or not fence or #fence ~= 39 or string.find(fence, '%D') or not ttl or ttl < 0 then
  return { -4, 0 }
end
local stored = redis.call('HGET', key, 'fence')
if stored and stored > fence then return { 0, stored } end
redis.call('HSET', key, 'value', value, 'fence', fence)
if ttl > 0 then redis.call('PEXPIRE', key, ttl) end
return { 1, fence }
