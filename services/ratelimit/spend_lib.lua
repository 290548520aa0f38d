-- The functions of the spend scripts (spend_hold.lua, spend_settle.lua), defined before them.
--
-- A budget is a hash {spent, held, limit, scope, subject, period, "h:<request id>": what that request holds}
-- and a sorted set "<budget>:h" of the request ids holding money, scored by when their hold lapses: a hold
-- whose request never settled (its router died) goes back to the budget once it lapses. Amounts are whole
-- millionths of the currency. A request's hold is a hash {amount, prompt, keys, limits}.

local function split(s)
  local t = {}
  for part in string.gmatch(s or "", "[^\n]+") do t[#t + 1] = part end
  return t
end

local function now_ms()
  local t = redis.call("TIME")
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Returns what one request holds in one budget to it; that amount.
local function release(k, id)
  local a = tonumber(redis.call("HGET", k, "h:" .. id) or "0")
  if a ~= 0 then redis.call("HINCRBY", k, "held", -a) end
  redis.call("HDEL", k, "h:" .. id)
  redis.call("ZREM", k .. ":h", id)
  return a
end

local function add(k, id, amount)
  redis.call("HINCRBY", k, "held", amount)
  redis.call("HINCRBY", k, "h:" .. id, amount)
end

-- The tightest budget (its index), what it has left, and what each has left; lapsed holds returned first.
local function left_in(keys, limits)
  local now = now_ms()
  local tight, least, each = 0, -1, {}
  for i = 1, #keys do
    for _, id in ipairs(redis.call("ZRANGEBYSCORE", keys[i] .. ":h", "-inf", now)) do release(keys[i], id) end
    local v = redis.call("HMGET", keys[i], "spent", "held")
    local left = tonumber(limits[i]) - tonumber(v[1] or "0") - tonumber(v[2] or "0")
    each[i] = math.max(0, left)
    if least < 0 or left < least then tight, least = i, left end
  end
  return tight, math.max(0, least), each
end
