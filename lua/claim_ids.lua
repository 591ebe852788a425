--[[
  Idempotency by (workflow, explicit event id), whatever the event's key: ingress claims each
  digest here, on the shard the digest routes to, before it appends the run requests (which go
  to the shards of their groups). The first inbox entry to claim a digest owns it for the window;
  the same entry may claim it again (a redelivery after a crash between this call and the
  append), any other entry is a duplicate and appends nothing. Digests older than the window
  are forgotten, and, while the shard holds more than the cap, the oldest ones, though none
  claimed within the floor; at most 1000 per call more than the call claims, so a shard's
  digests never grow past the window and the cap while ingress reads full batches (at most
  1000 a call, they grew by the difference: a backlog of 200,000 events of two workflows held
  239,000 digests at a cap of 2,000, all past a 2 s window, a probe).

  Input:
    KEYS[1]  ids hash       digest -> inbox entry id that owns it
    KEYS[2]  ids-at zset    digest by the time it was claimed (ms)
    ARGV[1]  now in ms, or 0 for the server clock
    ARGV[2]  de-duplication window in ms
    ARGV[3]  at most this many digests kept in this shard (0: no cap)
    ARGV[4]  floor in ms: no digest is forgotten by the cap sooner after its claim
    ARGV[5..] pairs: digest, inbox entry id

  Output:
    {0, flag, ...}  one flag per pair: 1 owned by this entry (claimed now or before), 0 owned
                    by another entry (a duplicate)
    {-4, 0}         bad ARGV; nothing written

  Writes: no stream.
]]
local rcall = redis.call
local idsKey, idsAtKey = KEYS[1], KEYS[2]

-- @include now
-- @include cap

local now = nowMs(ARGV[1])
local window, cap, floor = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])
if not window or not cap or not floor or (#ARGV - 4) % 2 ~= 0 then return { -4, 0 } end

local old = overdue(idsAtKey, now, window, cap, floor, 1000 + (#ARGV - 4) / 2)
for j = 1, #old, 1000 do  -- (Lua unpacks about 8,000 values at most)
  local last = math.min(j + 999, #old)
  rcall('HDEL', idsKey, unpack(old, j, last))
  rcall('ZREM', idsAtKey, unpack(old, j, last))
end

local out = { 0 }
for i = 5, #ARGV, 2 do
  local digest, entry = ARGV[i], ARGV[i + 1]
  local owner = rcall('HGET', idsKey, digest)
  if not owner then
    rcall('HSET', idsKey, digest, entry)
    rcall('ZADD', idsAtKey, now, digest)
    out[#out + 1] = 1
  elseif owner == entry then
    out[#out + 1] = 1
  else
    out[#out + 1] = 0
  end
end
return out
