"""pagedllm: a fast, simple LLM inference and serving engine.

NOTE: names are imported lazily, so `import pagedllm.engine` (pure Python) pulls in no torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "pagedllm.llm",
    "SamplingParams": "pagedllm.sampling_params",
    "RequestOutput": "pagedllm.outputs",
    "CompletionOutput": "pagedllm.outputs",
    "Logprob": "pagedllm.outputs",
    "RequestOutputKind": "pagedllm.sampling_params",
    "StructuredOutputsParams": "pagedllm.sampling_params",
    "EngineArgs": "pagedllm.engine_args",
}

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineArgs",
    "Logprob",
    "RequestOutput",
    "RequestOutputKind",
    "SamplingParams",
    "StructuredOutputsParams",
]

if TYPE_CHECKING:
    from pagedllm.engine_args import EngineArgs
    from pagedllm.llm import LLM
    from pagedllm.outputs import CompletionOutput, Logprob, RequestOutput
    from pagedllm.sampling_params import RequestOutputKind, SamplingParams, StructuredOutputsParams


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'pagedllm' has no attribute {name!r}")
