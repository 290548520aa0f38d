-- Holds money for a request in every spend budget that applies, or in none; or holds more for a request
-- that holds some (a stream that has used what it held). See spend_lib.lua for how budgets are kept.
--
-- mode "hold": KEYS: budget_1, ..., budget_n, hold, estimates, index (the tenant's budgets, for usage reports)
--   ARGV: "hold", n, limit_1..limit_n, keep_ms_1..keep_ms_n (0: kept for ever), base (the prompt's cost),
--         per_token (a completion token's cost, a decimal), max_extra, percentile, min_samples, prompt_tokens,
--         hold_ms, request id, then per budget its scope, subject and period (shown by usage reports)
--   What the request held before is returned first (it is held again, on measured counts), then
--   base + the completion estimate's cost is held in every budget, if it fits in every one.
--   Returns {held (0: refused), amount, estimate, tightest budget's index, what it has left, then what each
--   budget has left}
-- mode "extend": KEYS: hold. ARGV: "extend", amount, request id
--   Holds up to amount more in the hold's budgets: as much as the tightest has left.
--   Returns {granted, amount held in all, prompt_tokens of the hold, tightest budget's index, what it has left}

if ARGV[1] == "extend" then
  local rec, id = KEYS[1], ARGV[3]
  local f = redis.call("HMGET", rec, "amount", "prompt", "keys", "limits")
  if not f[1] then return {0, 0, 0, 0, 0} end
  local keys, limits = split(f[3]), split(f[4])
  local tight, least = left_in(keys, limits)
  local grant = math.min(tonumber(ARGV[2]), least)
  if grant > 0 then
    for _, k in ipairs(keys) do add(k, id, grant) end
    redis.call("HINCRBY", rec, "amount", grant)
  end
  return {grant, tonumber(f[1]) + grant, tonumber(f[2]), tight, least - grant}
end

local n = tonumber(ARGV[2])
local rec, est, index = KEYS[n + 1], KEYS[n + 2], KEYS[n + 3]
local at = 3 + 2 * n
local id = ARGV[at + 7]
local prior = redis.call("HGET", rec, "keys")
if prior then
  for _, k in ipairs(split(prior)) do release(k, id) end
  redis.call("DEL", rec)
end

local estimate = completion_estimate(est, tonumber(ARGV[at + 2]), tonumber(ARGV[at + 3]), tonumber(ARGV[at + 4]))
local amount = tonumber(ARGV[at]) + math.ceil(estimate * tonumber(ARGV[at + 1]))
local keys, limits = {}, {}
for i = 1, n do keys[i], limits[i] = KEYS[i], ARGV[2 + i] end
local tight, least, each = left_in(keys, limits)
local out = {0, amount, estimate, tight, least}
for i = 1, n do out[5 + i] = each[i] end
if amount > least then return out end
local lapses = now_ms() + tonumber(ARGV[at + 6])
for i = 1, n do
  add(keys[i], id, amount)
  redis.call("ZADD", keys[i] .. ":h", lapses, id)
  local d = at + 8 + 3 * (i - 1)
  redis.call("HSET", keys[i], "limit", limits[i], "scope", ARGV[d], "subject", ARGV[d + 1], "period", ARGV[d + 2])
  redis.call("SADD", index, keys[i])
  local keep = tonumber(ARGV[2 + n + i])
  if keep > 0 then
    redis.call("PEXPIRE", keys[i], keep)
    redis.call("PEXPIRE", keys[i] .. ":h", keep)
  end
end
redis.call("HSET", rec, "amount", amount, "prompt", ARGV[at + 5], "keys", table.concat(keys, "\n"),
  "limits", table.concat(limits, "\n"))
redis.call("PEXPIRE", rec, tonumber(ARGV[at + 6]))
out[1], out[5] = 1, least - amount
for i = 1, n do out[5 + i] = each[i] - amount end
return out
