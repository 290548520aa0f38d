"""Who may call what inside the mesh, by the caller's certificate identity (tls.peer_identity).

The same matrix as deploy/k8s/base/networkpolicies.yaml, enforced by identity instead of by address.
Health and reflection are open to any holder of a mesh certificate, so probes and grpcurl work with one.
"""

from __future__ import annotations

from services.runtime import errors

# By full method, or by service ("/package.Service/"); the longest matching entry decides.
CALLERS: dict[str, frozenset[str]] = {
    "/envoy.service.auth.v3.Authorization/": frozenset({"edge"}),
    "/meshserve.auth.v1.AuthAdminService/": frozenset({"edge"}),
    "/envoy.service.ratelimit.v3.RateLimitService/": frozenset({"edge"}),
    "/meshserve.ratelimit.v1.TokenBudgetService/": frozenset({"router"}),
    "/meshserve.llm.v1.LlmService/": frozenset({"edge"}),
    "/meshserve.llm.v2.LlmService/": frozenset({"edge"}),
    "/meshserve.inference.v1.InferenceService/": frozenset({"router"}),
    "/meshserve.billing.v1.BillingService/RecordUsage": frozenset({"router"}),
    # The edge forwards usage queries after ext_authz; `meshserve usage` asks billing as the operator.
    "/meshserve.billing.v1.BillingService/GetUsage": frozenset({"edge", "admin"}),
}


def allowed(full_method: str) -> frozenset[str] | None:
    """The identities that may call full_method; None: any mesh identity."""
    best: str | None = None
    for entry in CALLERS:
        matches = full_method == entry if not entry.endswith("/") else full_method.startswith(entry)
        if matches and (best is None or len(entry) > len(best)):
            best = entry
    return CALLERS[best] if best is not None else None


def check(full_method: str, callers: frozenset[str] | None, identity: str | None) -> None:
    """Raises PermissionDenied unless identity may make the call (allowed() gave callers)."""
    if identity is None:
        raise errors.PermissionDenied(f"{full_method}: the caller's certificate carries no mesh identity")
    if callers is not None and identity not in callers:
        raise errors.PermissionDenied(
            f"{full_method}: {identity!r} may not call it (allowed: {', '.join(sorted(callers))})"
        )
