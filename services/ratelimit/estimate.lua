-- The completion estimate of a request: a high percentile of the key's recent completions (kept in the list
-- est_key) once there are min_samples of them, never above max_extra (the most it may generate).
-- Defined, with learn_completion, before the scripts that use them (admit, settle and the spend scripts).
local function completion_estimate(est_key, max_extra, percentile, min_samples)
  local estimate = max_extra
  if est_key then
    local xs = redis.call("LRANGE", est_key, 0, -1)
    if #xs >= min_samples then
      for i = 1, #xs do xs[i] = tonumber(xs[i]) end
      table.sort(xs)
      local p = xs[math.max(1, math.ceil(percentile * #xs))]
      if p < estimate then estimate = p end
    end
  end
  return estimate
end

-- Keeps a completed request's completion tokens (none when tokens < 0) among the last `kept` of est_key.
local function learn_completion(est_key, tokens, kept)
  if tokens < 0 then return end
  redis.call("LPUSH", est_key, tokens)
  redis.call("LTRIM", est_key, 0, kept - 1)
  redis.call("PEXPIRE", est_key, 86400000)
end
