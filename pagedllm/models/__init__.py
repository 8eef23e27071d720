"""Model architectures, found by HF architecture name through `registry.resolve_model_cls`."""

from pagedllm.models.registry import register_model, resolve_model_cls, supported_architectures

__all__ = ["register_model", "resolve_model_cls", "supported_architectures"]
