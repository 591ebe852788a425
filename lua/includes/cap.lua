--[[
  overdue(zset, now, keep, cap, floor, limit): the members of `zset` (scored by when they were
  last used, ms) to forget now, oldest first, at most `limit`: those older than `keep` ms, or,
  while the zset holds more than `cap` members (0: no cap), as many of the oldest as are over
  it, though none used within `floor` ms. The caller deletes them (and what they index).
]]
local function overdue(zset, now, keep, cap, floor, limit)
  local old = redis.call('ZRANGEBYSCORE', zset, '-inf', now - keep, 'LIMIT', 0, limit)
  if cap > 0 and #old < limit then
    local excess = redis.call('ZCARD', zset) - cap
    if excess > #old then
      old = redis.call('ZRANGEBYSCORE', zset, '-inf', math.max(now - floor, now - keep),
        'LIMIT', 0, math.min(limit, excess))
    end
  end
  return old
end
