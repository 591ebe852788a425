--[[
  ackEntries(stream, group, first, step, last): XACK the entry ids found at ARGV[first],
  ARGV[first+step] .. up to ARGV[last] (default: the end) in chunks, so a batch of any size is
  one or a few calls. An empty id (an item that was never a stream entry) is skipped, and so
  is an id equal to the one before (the items of one entry come one after the other).
]]
local function ackEntries(stream, group, first, step, last)
  local ids = {}
  local prev
  for i = first, last or #ARGV, step do
    local id = ARGV[i]
    if id ~= '' and id ~= prev then ids[#ids + 1] = id end   -- ('': read from no stream)
    prev = id
    if #ids == 1000 then redis.call('XACK', stream, group, unpack(ids)); ids = {} end
  end
  if #ids > 0 then redis.call('XACK', stream, group, unpack(ids)) end
end
