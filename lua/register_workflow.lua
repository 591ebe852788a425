--[[
  Stores one workflow definition in the registry, unless the same version is already stored
  with other content: a version names one definition for good (runs and groups carry it), so
  new limits or steps need a new version. Bumps the registry epoch only when something changed.

  Input:
    KEYS[1]  workflows hash     workflow id -> JSON definition
    KEYS[2]  registry epoch     counter (string)
    KEYS[3]  versions hash      workflow id -> JSON array of the versions registered, oldest
                                first, the newest ARGV[4] kept
    KEYS[4]  retentions hash    workflow id -> seconds its ended runs are kept
    ARGV[1]  workflow id
    ARGV[2]  its version
    ARGV[3]  the JSON definition
    ARGV[4]  versions kept per workflow
    ARGV[5]  its retention in seconds, or '' for admission's default (written even when the
             definition is unchanged: it is not part of the version)

  Output:
    {0, 0}                    unchanged (the same definition is stored)
    {0, 1}                    stored, epoch bumped
    {0, 2, stored version}    refused: this version is stored with other content; nothing written
    {-4, 0}                   bad ARGV; nothing written

  Writes: no stream.
]]
local rcall = redis.call
local workflowsKey, epochKey, versionsKey, retentionsKey = KEYS[1], KEYS[2], KEYS[3], KEYS[4]

local wid, version, body, keep = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4])
if not wid or wid == '' or not version or version == '' or not body or not keep or keep < 1 then
  return { -4, 0 }
end

local stored = rcall('HGET', workflowsKey, wid)
local ok, old = false, nil
if stored and stored ~= body then
  ok, old = pcall(cjson.decode, stored)
  if ok and type(old) == 'table' and old.version == version then return { 0, 2, version } end
end
if ARGV[5] and ARGV[5] ~= '' then
  rcall('HSET', retentionsKey, wid, ARGV[5])
else
  rcall('HDEL', retentionsKey, wid)
end
if stored == body then return { 0, 0 } end
rcall('HSET', workflowsKey, wid, body)
rcall('INCR', epochKey)
local known = rcall('HGET', versionsKey, wid)
local okv, was = pcall(cjson.decode, known or '[]')
-- (a definition stored before versions were kept: its version comes first)
if not known and ok and type(old) == 'table' and type(old.version) == 'string' then
  was = { old.version }
end
local versions = {}
if okv and type(was) == 'table' then
  for i = 1, #was do
    if was[i] ~= version then versions[#versions + 1] = was[i] end
  end
end
versions[#versions + 1] = version
local kept = {}
for i = math.max(1, #versions - keep + 1), #versions do kept[#kept + 1] = versions[i] end
rcall('HSET', versionsKey, wid, cjson.encode(kept))
return { 0, 1 }
