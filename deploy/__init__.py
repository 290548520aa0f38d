"""Deployment artefacts that are generated from Python (the Envoy edge config)."""
