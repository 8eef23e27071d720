"""The worker: one device's model, KV cache and step execution (torch lives here and below)."""
