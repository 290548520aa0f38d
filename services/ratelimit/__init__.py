"""The rate-limit service: Envoy request limits and token budgets over sliding windows in Redis."""
