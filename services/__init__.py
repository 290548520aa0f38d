"""meshserve services: one package per service over a shared runtime."""
