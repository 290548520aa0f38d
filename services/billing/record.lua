-- Counts a batch of usage records into their hourly buckets, each once per request id.
-- KEYS[1] set of buckets the ledger has not caught up with; then per record i (from 0):
--   KEYS[2 + 2i] its request marker, KEYS[3 + 2i] its bucket hash.
-- ARGV[1] marker ttl seconds, ARGV[2] bucket ttl seconds, ARGV[3] a fresh generation id (kept only by a call
-- that creates a bucket); then per record 8 values: tenant, key_id, model, hour (unix seconds), prompt tokens,
-- completion tokens, outcome, written-off tokens (generated, received by no client, not billed). A record of
-- outcome cached (answered from the router's response cache) counts its tokens apart, as cached_* tokens.
-- Returns one number per record: 1 when counted, 0 for a request counted before.
local counted = {}
local n = (#KEYS - 1) / 2
for i = 0, n - 1 do
  local marker, bucket, a = KEYS[2 + 2 * i], KEYS[3 + 2 * i], 3 + 8 * i
  if redis.call('SET', marker, '1', 'NX', 'EX', ARGV[1]) then
    redis.call('HSET', bucket, 'tenant', ARGV[a + 1], 'key_id', ARGV[a + 2], 'model', ARGV[a + 3], 'hour', ARGV[a + 4])
    -- A bucket recreated after Redis lost it gets a new generation: its own ledger row, never overwriting the old one.
    redis.call('HSETNX', bucket, 'generation', ARGV[3])
    redis.call('HINCRBY', bucket, 'requests', 1)
    local kind = ''
    if ARGV[a + 7] == 'cached' then kind = 'cached_' end
    redis.call('HINCRBY', bucket, kind .. 'prompt_tokens', ARGV[a + 5])
    redis.call('HINCRBY', bucket, kind .. 'completion_tokens', ARGV[a + 6])
    redis.call('HINCRBY', bucket, ARGV[a + 7], 1)
    redis.call('HINCRBY', bucket, 'written_off_tokens', ARGV[a + 8])
    -- Every change bumps the version: the ledger marks a bucket clean only at the version it wrote.
    redis.call('HINCRBY', bucket, 'version', 1)
    redis.call('EXPIRE', bucket, ARGV[2])
    redis.call('SADD', KEYS[1], bucket)
    counted[i + 1] = 1
  else
    counted[i + 1] = 0
  end
end
return counted
