"""HTTP routers of the gateway: the OpenAI-compatible API and the admin API."""
