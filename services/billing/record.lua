-- Counts one usage record into its hourly bucket, once per request id.
-- KEYS[1] request marker, KEYS[2] bucket hash, KEYS[3] set of buckets the ledger has not caught up with.
-- ARGV: marker ttl seconds, tenant, key_id, model, hour (unix seconds), prompt tokens, completion tokens, outcome,
-- bucket ttl seconds, a fresh generation id (kept only by the call that creates the bucket).
-- Returns 1 when counted, 0 for a request counted before.
if not redis.call('SET', KEYS[1], '1', 'NX', 'EX', ARGV[1]) then
  return 0
end
redis.call('HSET', KEYS[2], 'tenant', ARGV[2], 'key_id', ARGV[3], 'model', ARGV[4], 'hour', ARGV[5])
-- A bucket recreated after Redis lost it gets a new generation: its own ledger row, never overwriting the old one.
redis.call('HSETNX', KEYS[2], 'generation', ARGV[10])
redis.call('HINCRBY', KEYS[2], 'requests', 1)
redis.call('HINCRBY', KEYS[2], 'prompt_tokens', ARGV[6])
redis.call('HINCRBY', KEYS[2], 'completion_tokens', ARGV[7])
redis.call('HINCRBY', KEYS[2], ARGV[8], 1)
-- Every change bumps the version: the ledger marks a bucket clean only at the version it wrote.
redis.call('HINCRBY', KEYS[2], 'version', 1)
redis.call('EXPIRE', KEYS[2], ARGV[9])
redis.call('SADD', KEYS[3], KEYS[2])
return 1
