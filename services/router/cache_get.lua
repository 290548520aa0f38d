-- Reads one answer of the response cache and marks it used now (the least recently used go first).
-- KEYS[1] the answer, KEYS[2] the recency index; ARGV[1] now (unix seconds). Returns the answer, or nil.
local answer = redis.call('GET', KEYS[1])
if answer then redis.call('ZADD', KEYS[2], 'XX', ARGV[1], KEYS[1]) end
return answer
