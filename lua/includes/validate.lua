--[[
  badRequestField(req): the name of the first invalid field of a run request, or nil.
]]
local function isInt(x, lo, hi) return type(x) == 'number' and x == math.floor(x) and x >= lo and x <= hi end
local function isStr(x, maxLen) return type(x) == 'string' and #x > 0 and #x <= maxLen end
local function isOptStr(x) return x == nil or type(x) == 'string' end

local function badRequestField(q)
  if not isStr(q.id, 200) or string.find(q.id, '|', 1, true) then return 'id' end
  if not isStr(q.g, 16) or #q.g ~= 16 or string.find(q.g, '[^0-9a-f]') then return 'g' end
  if not isStr(q.s, 32) or #q.s ~= 32 or string.find(q.s, '[^0-9a-f]') then return 's' end
  if not isStr(q.w, 1000) then return 'w' end
  if not isStr(q.v, 1000) then return 'v' end
  if not isInt(q.max, 1, 10000) then return 'max' end
  if not isInt(q.st, 1, 3) then return 'st' end
  if q.x ~= nil and not isInt(q.x, 0, 1) then return 'x' end
  if q.m ~= nil and not isInt(q.m, 1, 1000) then return 'm' end
  if not isOptStr(q.k) then return 'k' end
  if not isOptStr(q.ev) then return 'ev' end
  if not isOptStr(q['in']) then return 'in' end
  return nil
end
