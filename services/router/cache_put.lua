-- Keeps one answer in the response cache, within its memory bound; the least recently used answers go first.
-- KEYS[1] the answer, KEYS[2] the recency index (sorted set: answer key -> last use), KEYS[3] the sizes (hash:
-- answer key -> bytes), KEYS[4] the bytes held in total.
-- ARGV[1] the answer, ARGV[2] its ttl in seconds, ARGV[3] now (unix seconds), ARGV[4] the most bytes held.
-- Returns {bytes held after, the keys evicted to make room...}.
local answer, recency, sizes, total = KEYS[1], KEYS[2], KEYS[3], KEYS[4]
local ttl, now, most = tonumber(ARGV[2]), tonumber(ARGV[3]), tonumber(ARGV[4])

local function drop(key)
  local size = tonumber(redis.call('HGET', sizes, key) or '0')
  redis.call('HDEL', sizes, key)
  redis.call('ZREM', recency, key)
  redis.call('DEL', key)
  redis.call('DECRBY', total, size)
end

-- Answers unused for longer than the ttl have expired (an answer is used no earlier than it is kept): forgotten,
-- not counted as evictions.
for _, key in ipairs(redis.call('ZRANGEBYSCORE', recency, '-inf', now - ttl)) do drop(key) end
if redis.call('HEXISTS', sizes, answer) == 1 then drop(answer) end
redis.call('SET', answer, ARGV[1], 'EX', ttl)
redis.call('ZADD', recency, now, answer)
redis.call('HSET', sizes, answer, #ARGV[1])
local held = redis.call('INCRBY', total, #ARGV[1])
local result = {0}
while held > most do
  local oldest = redis.call('ZRANGE', recency, 0, 0)[1]
  if not oldest or oldest == answer then break end
  drop(oldest)
  table.insert(result, oldest)
  held = tonumber(redis.call('GET', total))
end
result[1] = held
return result
