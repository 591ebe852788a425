--[[
  Stores workflow definitions in the registry, all or none: one executor's module is one call,
  so a reader never sees part of it (the workflows of a scope change their limits together).
  A version names one definition for good (runs and groups carry it), so new limits or steps
  need a new version: one already stored with other content refuses the whole call. Bumps the
  registry epoch once, and only when something changed. Names, in the same step, the version
  each workflow was registered in last, and marks it served now (an executor registering as
  it starts) or not served since (`supersede register` ahead of a deploy): the executors'
  definition heal reads both (services/executor/service.py, keep_registered); written apart,
  two registrations at once left one version stored and the other named, and the heal off.

  Input:
    KEYS[1]  workflows hash     workflow id -> JSON definition
    KEYS[2]  registry epoch     counter (string)
    KEYS[3]  versions hash      workflow id -> JSON array of the versions registered, oldest
                                first, the newest ARGV[1] kept
    KEYS[4]  retentions hash    workflow id -> seconds its ended runs are kept
    KEYS[5]  served-versions    'id\nversion' -> ms (the server's clock) an executor last said
             hash               it serves it (the bare 'id' field 0.3.16 wrote is deleted:
                                older executors read every value there as a number)
    KEYS[6]  registered hash    workflow id -> the version registered last
    ARGV[1]  versions kept per workflow
    ARGV[2]  '1': mark each version served now (its registering executor serves it); '': delete
             its mark (not served since)
    ARGV[3..] quadruples, one per workflow (each id at most once):
              workflow id, its version, the JSON definition, its retention in seconds or ''
              for admission's default (written even when the definition is unchanged: it is
              not part of the version)

  Output:
    {0, changed}                   stored; changed: how many definitions changed (the epoch
                                   was bumped once when > 0)
    {0, -1, workflow id, version}  refused: that version is stored with other content;
                                   nothing written
    {-4, 0}                        bad ARGV; nothing written

  Writes: no stream.
]]
local rcall = redis.call
local workflowsKey, epochKey, versionsKey, retentionsKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local servedKey, registeredKey = KEYS[5], KEYS[6]

-- @include now

local keep, serving = tonumber(ARGV[1]), ARGV[2] == '1'
if not keep or keep < 1 or #ARGV < 6 or (#ARGV - 2) % 4 ~= 0 then return { -4, 0 } end

-- Validate every definition before writing any.
local items, seen = {}, {}
for i = 3, #ARGV, 4 do
  local wid, version, body = ARGV[i], ARGV[i + 1], ARGV[i + 2]
  if wid == '' or version == '' or body == '' or seen[wid] then return { -4, 0 } end
  seen[wid] = true
  local stored = rcall('HGET', workflowsKey, wid)
  local old = nil
  if stored and stored ~= body then
    local ok, decoded = pcall(cjson.decode, stored)
    if ok and type(decoded) == 'table' then old = decoded end
    if old and old.version == version then return { 0, -1, wid, version } end
  end
  items[#items + 1] = { wid = wid, version = version, body = body, retention = ARGV[i + 3],
                        stored = stored, old = old }
end

local changed = 0
for _, it in ipairs(items) do
  if it.retention ~= '' then
    rcall('HSET', retentionsKey, it.wid, it.retention)
  else
    rcall('HDEL', retentionsKey, it.wid)
  end
  if it.stored ~= it.body then
    rcall('HSET', workflowsKey, it.wid, it.body)
    changed = changed + 1
    local known = rcall('HGET', versionsKey, it.wid)
    local okv, was = pcall(cjson.decode, known or '[]')
    -- (a definition stored before versions were kept: its version comes first)
    if not known and it.old and type(it.old.version) == 'string' then
      okv, was = true, { it.old.version }
    end
    local versions = {}
    if okv and type(was) == 'table' then
      for j = 1, #was do
        if was[j] ~= it.version then versions[#versions + 1] = was[j] end
      end
    end
    versions[#versions + 1] = it.version
    local kept = {}
    for j = math.max(1, #versions - keep + 1), #versions do kept[#kept + 1] = versions[j] end
    rcall('HSET', versionsKey, it.wid, cjson.encode(kept))
  end
end
local now = serving and nowMs(0) or nil
for _, it in ipairs(items) do
  rcall('HSET', registeredKey, it.wid, it.version)
  rcall('HDEL', servedKey, it.wid)
  if serving then
    rcall('HSET', servedKey, it.wid .. '\n' .. it.version, now)
  else
    rcall('HDEL', servedKey, it.wid .. '\n' .. it.version)
  end
end
if changed > 0 then rcall('INCR', epochKey) end
return { 0, changed }
