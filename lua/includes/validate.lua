--[[
  badRequestField(req): the name of the first invalid field of a run request, or nil.
  Kept to type and length checks: pattern matching per field costs more than the rest of the
  admission of a request. Group ids and sequences are fixed-width by construction (shared.model).
]]
local function badRequestField(q)
  local id = q.id
  if type(id) ~= 'string' or #id == 0 or #id > 200 then return 'id' end
  if type(q.g) ~= 'string' or #q.g ~= 16 then return 'g' end
  if type(q.s) ~= 'string' or #q.s ~= 32 then return 's' end
  if type(q.w) ~= 'string' or #q.w == 0 then return 'w' end
  if type(q.v) ~= 'string' or #q.v == 0 then return 'v' end
  local mx = q.max
  if type(mx) ~= 'number' or mx < 1 or mx > 10000 or mx % 1 ~= 0 then return 'max' end
  local sg = q.st
  if type(sg) ~= 'number' or sg < 1 or sg > 5 or sg % 1 ~= 0 then return 'st' end
  if q.x ~= nil and q.x ~= 0 and q.x ~= 1 then return 'x' end
  if q.u ~= nil and q.u ~= 0 and q.u ~= 1 then return 'u' end
  if q.sc ~= nil and q.sc ~= 0 and q.sc ~= 1 then return 'sc' end
  if q.tp ~= nil and (type(q.tp) ~= 'string' or #q.tp > 64) then return 'tp' end
  if q.db ~= nil and (type(q.db) ~= 'number' or q.db < 0 or q.db > 86400000) then return 'db' end
  if q.dw ~= nil and (type(q.dw) ~= 'number' or q.dw < 0 or q.dw > 86400000) then return 'dw' end
  local m = q.m
  if m ~= nil and (type(m) ~= 'number' or m < 1 or m > 1000 or m % 1 ~= 0) then return 'm' end
  if q.k ~= nil and type(q.k) ~= 'string' then return 'k' end
  if q.ev ~= nil and type(q.ev) ~= 'string' then return 'ev' end
  if q['in'] ~= nil and type(q['in']) ~= 'string' then return 'in' end
  return nil
end
