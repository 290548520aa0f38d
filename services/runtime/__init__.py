"""The shared runtime: start-up, health, metrics, logs and shutdown for every service."""
