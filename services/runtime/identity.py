"""The headers that carry a caller's identity from the edge's auth check to the backends."""

TENANT_HEADER = "x-meshserve-tenant"
KEY_ID_HEADER = "x-meshserve-key-id"
# Comma-separated model ids the key may use, or "*" for all.
MODELS_HEADER = "x-meshserve-models"
