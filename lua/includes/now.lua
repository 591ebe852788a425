--[[
  nowMs(arg): the caller's clock in ms when it passed one (tests drive time), else the server's;
  and, as a second result, the same instant in µs (the server's own µs, or the caller's ms
  × 1000), for the hop times runs record.
]]
local function nowMs(arg)
  local n = tonumber(arg)
  if n and n > 0 then return n, n * 1000 end
  local t = redis.call('TIME')
  local us = tonumber(t[1]) * 1000000 + tonumber(t[2])
  return math.floor(us / 1000), us
end
