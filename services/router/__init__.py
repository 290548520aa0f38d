"""The router: the public OpenAI-shaped API, in front of the inference replicas."""
