"""Model loading: build the registered architecture on the device, then fill its weights; and
fetching the default model (`default_model`).

NOTE: names are imported lazily, so `pagedllm download` (loader.default_model) loads no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["available_load_formats", "load_and_check_weights", "load_model", "register_load_format"]

if TYPE_CHECKING:
    from pagedllm.loader.model_loader import (
        available_load_formats,
        load_and_check_weights,
        load_model,
        register_load_format,
    )


def __getattr__(name: str) -> Any:
    if name in __all__:
        from pagedllm.loader import model_loader

        return getattr(model_loader, name)
    raise AttributeError(f"module 'pagedllm.loader' has no attribute {name!r}")
