-- Admits `amount` into every sliding window named in KEYS, or into none. Admitting a reservation id
-- that holds one already replaces it (a request that reserved an estimate, then its exact count).
--
-- A window is a sorted set of entries "<id>:<amount>" scored by admission time (ms)
-- and a running sum of their amounts. Entries older than the window are dropped and
-- subtracted first, so the check is exact: at most `limit` in any window.
--
-- An admission made ahead of its request (a spare: services/ratelimit/spares.py) is stamped `ahead_ms` after
-- now, the latest its request may take it: it counts in every window until a whole window after any use.
--
-- KEYS: zset_1, sum_1, ..., zset_n, sum_n [, reservation, estimates]
-- ARGV: now_ms ("" = Redis TIME), id, base, max_extra (-1: none), percentile,
--       min_samples, dry (1: only report), n, limit_1, window_ms_1, ..., limit_n, window_ms_n [, ahead_ms
--       [, times]]
-- Returns: {admitted, amount, retry_ms (-1: never fits), now, estimate, used_1, oldest_1, ...}

local now
if ARGV[1] == "" then
  local t = redis.call("TIME")
  now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
else
  now = tonumber(ARGV[1])
end
local id = ARGV[2]
local amount = tonumber(ARGV[3])
local max_extra = tonumber(ARGV[4])
local dry = ARGV[7] == "1"
local n = tonumber(ARGV[8])
local ahead = tonumber(ARGV[9 + 2 * n] or "0")
local stamp = now + ahead
-- A spare holds the tokens of `times` requests: `base` their prompts, and a completion estimate for each.
local times = tonumber(ARGV[10 + 2 * n] or "1")

-- The completion estimate: a high percentile of this key's recent completions, never above max_extra.
local estimate = 0
if max_extra >= 0 then
  estimate = completion_estimate(KEYS[2 * n + 2], max_extra, tonumber(ARGV[5]), tonumber(ARGV[6]))
  amount = amount + estimate * times
end

-- A key lives at least ms from now: never shorter than an entry stamped ahead needs.
local function last_for(key, ms)
  if redis.call("PTTL", key) < ms then redis.call("PEXPIRE", key, ms) end
end

local function amount_of(member)
  return tonumber(string.match(member, ":(%d+)$"))
end

-- A reservation admitted again under the same id replaces the one it holds: the check counts the windows
-- without it, and whatever the outcome the old entry goes (refused, nothing is held for this id).
local prior, prior_amount, held = nil, 0, {}
local rec_key = KEYS[2 * n + 1]
if rec_key and not dry then
  local f = redis.call("HMGET", rec_key, "ts", "amount")
  if f[1] then prior, prior_amount = id .. ":" .. f[2], tonumber(f[2]) end
end

local used, limits, windows = {}, {}, {}
local admitted, retry = 1, 0
for i = 1, n do
  local z, s = KEYS[2 * i - 1], KEYS[2 * i]
  local limit, window = tonumber(ARGV[7 + 2 * i]), tonumber(ARGV[8 + 2 * i])
  limits[i], windows[i] = limit, window
  local cutoff = now - window
  local sum = 0
  if redis.call("EXISTS", z) == 1 then sum = tonumber(redis.call("GET", s) or "0") end
  local expired = redis.call("ZRANGEBYSCORE", z, "-inf", cutoff)
  if #expired > 0 then
    for _, m in ipairs(expired) do sum = sum - amount_of(m) end
    redis.call("ZREMRANGEBYSCORE", z, "-inf", cutoff)
    if sum < 0 then sum = 0 end
    redis.call("SET", s, sum, "KEEPTTL")
  end
  if prior and redis.call("ZSCORE", z, prior) then
    held[i] = true
    sum = math.max(0, sum - prior_amount)
  end
  used[i] = sum
  if sum + amount > limit then
    admitted = 0
    if amount > limit then
      retry = -1
    elseif retry >= 0 then
      -- Wait until enough of the oldest entries leave the window.
      local need, freed, wait = sum + amount - limit, 0, window
      local entries = redis.call("ZRANGE", z, 0, 999, "WITHSCORES")
      for j = 1, #entries, 2 do
        freed = freed + amount_of(entries[j])
        if freed >= need then
          wait = tonumber(entries[j + 1]) + window - now
          break
        end
      end
      if wait > retry then retry = wait end
    end
  end
end

for i = 1, n do
  if held[i] then
    redis.call("ZREM", KEYS[2 * i - 1], prior)
    redis.call("SET", KEYS[2 * i], used[i], "KEEPTTL")
  end
end
if prior and admitted == 0 then redis.call("DEL", rec_key) end

if admitted == 1 and not dry then
  local member = id .. ":" .. amount
  for i = 1, n do
    local z, s = KEYS[2 * i - 1], KEYS[2 * i]
    redis.call("ZADD", z, stamp, member)
    used[i] = used[i] + amount
    redis.call("SET", s, used[i], "KEEPTTL")
    last_for(s, windows[i] + ahead)
    last_for(z, windows[i] + ahead)
  end
  local rec = KEYS[2 * n + 1]
  if rec then
    local longest = 0
    for i = 1, n do if windows[i] > longest then longest = windows[i] end end
    redis.call("HSET", rec, "ts", stamp, "amount", amount)
    redis.call("PEXPIRE", rec, longest + ahead)
  end
end

local out = {admitted, amount, retry, now, estimate}
for i = 1, n do
  local oldest = redis.call("ZRANGE", KEYS[2 * i - 1], 0, 0, "WITHSCORES")
  out[#out + 1] = used[i]
  out[#out + 1] = oldest[2] and tonumber(oldest[2]) or -1
end
return out
