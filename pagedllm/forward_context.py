"""The one scoped global: the attention metadata of the step being run.

The model runner sets it around the forward pass; `Attention` layers read it, so model code
never threads metadata through its call signatures.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pagedllm.attention.backend import AttentionMetadata


@dataclass
class ForwardContext:
    attn_metadata: AttentionMetadata | None


_current: ForwardContext | None = None


@contextmanager
def set_forward_context(attn_metadata: AttentionMetadata | None) -> Iterator[None]:
    global _current
    previous = _current
    _current = ForwardContext(attn_metadata=attn_metadata)
    try:
        yield
    finally:
        _current = previous


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("no forward context: run the model inside set_forward_context(...)")
    return _current
