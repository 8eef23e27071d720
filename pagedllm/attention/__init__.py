"""Attention: the backend interface, its metadata, the registry of backends, and the layer."""
