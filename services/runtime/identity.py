"""The headers that carry a caller's identity from the edge's auth check to the backends."""

TENANT_HEADER = "x-meshserve-tenant"
KEY_ID_HEADER = "x-meshserve-key-id"
# "true" for an admin key: it may read every tenant's usage.
ADMIN_HEADER = "x-meshserve-admin"
# Comma-separated model ids the key may use, or "*" for all.
MODELS_HEADER = "x-meshserve-models"
# The key's own rate limits (0: its plan's), for the edge's rate-limit filter and the router's token budget.
KEY_RPM_HEADER = "x-meshserve-key-rpm"
KEY_TPM_HEADER = "x-meshserve-key-tpm"
# The key's spend budget, "<amount>/<period>", or NO_BUDGET (never empty: the edge then overwrites whatever a
# client sent, where it might skip an empty value).
KEY_BUDGET_HEADER = "x-meshserve-key-budget"
NO_BUDGET = "none"
# Every header of the identity above (what the edge drops from a client where it makes no auth check).
IDENTITY_HEADERS = (
    TENANT_HEADER,
    KEY_ID_HEADER,
    ADMIN_HEADER,
    MODELS_HEADER,
    KEY_RPM_HEADER,
    KEY_TPM_HEADER,
    KEY_BUDGET_HEADER,
)
# The model a request names, read from its body by the edge, for per-model request limits. Set only by the edge.
MODEL_HEADER = "x-meshserve-model"
# Largest gRPC metadata (headers) a service accepts: above the edge's own header limit, so an oversized
# header is the edge's 431 and never a backend's RESOURCE_EXHAUSTED (a 429 the SDKs retry forever).
METADATA_BYTES = 64 * 1024
