--[[
  now(arg): the caller's clock in ms when it passed one (tests drive time), else the server's.
]]
local function nowMs(arg)
  local n = tonumber(arg)
  if n and n > 0 then return n end
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
