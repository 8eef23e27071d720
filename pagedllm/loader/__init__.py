"""Model loading: build the registered architecture on the device, then fill its weights."""

from pagedllm.loader.model_loader import (
    available_load_formats,
    load_and_check_weights,
    load_model,
    register_load_format,
)

__all__ = ["available_load_formats", "load_and_check_weights", "load_model", "register_load_format"]
