"""The auth service: API keys in Redis, checked at the edge through Envoy's ext_authz."""
