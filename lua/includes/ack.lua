--[[
  ackEntries(stream, group, first, step, last): XACK the entry ids found at ARGV[first],
  ARGV[first+step] .. up to ARGV[last] (default: the end) in chunks, so a batch of any size is
  one or a few calls. An empty id (an item that was never a stream entry) is skipped.
]]
local function ackEntries(stream, group, first, step, last)
  local ids = {}
  for i = first, last or #ARGV, step do
    if ARGV[i] ~= '' then ids[#ids + 1] = ARGV[i] end   -- ('': an item read from no stream)
    if #ids == 1000 then redis.call('XACK', stream, group, unpack(ids)); ids = {} end
  end
  if #ids > 0 then redis.call('XACK', stream, group, unpack(ids)) end
end
