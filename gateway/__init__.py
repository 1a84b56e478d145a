"""loragate gateway: supervises vLLM engines, hot-loads registry adapters, routes OpenAI requests."""
