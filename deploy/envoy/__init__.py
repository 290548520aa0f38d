"""The Envoy edge: its config generator and Lua filter."""
