-- Replaces a reservation's amount with the real one in every window it was admitted to.
--
-- KEYS: zset_1, sum_1, ..., zset_n, sum_n, reservation, estimates
-- ARGV: n, id, real amount, completion tokens to learn from (-1: none; several, comma-separated, for a spare's
--       requests: spares.py), estimates kept, keep (1: the reservation stays, to be settled again: a spare's
--       part settled while some of its requests are still running)
-- Returns: {settled, returned}: returned is negative when more was charged.

local n = tonumber(ARGV[1])
local id = ARGV[2]
local real = tonumber(ARGV[3])
local rec, est = KEYS[2 * n + 1], KEYS[2 * n + 2]

for tokens in string.gmatch(ARGV[4], "-?%d+") do
  learn_completion(est, tonumber(tokens), tonumber(ARGV[5]))
end

local fields = redis.call("HMGET", rec, "ts", "amount")
if not fields[1] then
  -- Already settled, or older than every window: it no longer counts.
  return {0, 0}
end
local ts, reserved = tonumber(fields[1]), tonumber(fields[2])
for i = 1, n do
  local z, s = KEYS[2 * i - 1], KEYS[2 * i]
  if redis.call("ZREM", z, id .. ":" .. reserved) == 1 then
    redis.call("ZADD", z, ts, id .. ":" .. real)
    redis.call("INCRBY", s, real - reserved)
  end
end
if ARGV[6] == "1" then
  redis.call("HSET", rec, "amount", real)
else
  redis.call("DEL", rec)
end
return {1, reserved - real}
