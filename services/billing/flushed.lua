-- Marks a bucket clean if it has not changed since the ledger read it.
-- KEYS[1] bucket hash, KEYS[2] set of buckets not yet in the ledger. ARGV[1] the version written.
if redis.call('HGET', KEYS[1], 'version') == ARGV[1] then
  redis.call('SREM', KEYS[2], KEYS[1])
  return 1
end
return 0
