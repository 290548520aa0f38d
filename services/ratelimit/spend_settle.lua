-- Settles a request's spend hold: its budgets charged the real cost in place of what it held.
-- See spend_lib.lua for how budgets are kept.
--
-- KEYS: hold, estimates. ARGV: cost (whole millionths), completion tokens to learn from (-1: none),
--   estimates kept, request id
-- Returns {settled, returned}: returned is what the hold held beyond the cost (negative: more was charged).

local rec, est, id = KEYS[1], KEYS[2], ARGV[4]
learn_completion(est, tonumber(ARGV[2]), tonumber(ARGV[3]))
local f = redis.call("HMGET", rec, "amount", "keys")
if not f[1] then return {0, 0} end -- settled already, or lapsed (its hold went back)
local cost = tonumber(ARGV[1])
for _, k in ipairs(split(f[2])) do
  release(k, id)
  redis.call("HINCRBY", k, "spent", cost)
end
redis.call("DEL", rec)
return {1, tonumber(f[1]) - cost}
