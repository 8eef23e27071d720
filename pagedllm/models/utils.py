"""`ModelContext`: what a model's constructors need besides the HF config, in one object.

A model class is built as `Model(ctx)`; each module passes `ctx.child("name")` to the modules it
builds, so every layer knows its dotted name (`model.layers.3.self_attn.qkv_proj`: what a
quantization config's ignore list or a per-layer setting is keyed by), the attention backend,
the quantization config, the parallel config and the kernel switches, without threading each of
them through every constructor.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pagedllm.config import KernelConfig, ParallelConfig

if TYPE_CHECKING:
    from pagedllm.attention.backend import AttentionBackend


@dataclass(frozen=True)
class ModelContext:
    hf_config: Any
    attn_backend: type[AttentionBackend]
    prefix: str = ""
    # A `pagedllm.layers.quantization` config, None for an unquantized checkpoint.
    quant_config: Any = None
    parallel_config: ParallelConfig = field(default_factory=ParallelConfig)
    kernel_config: KernelConfig = field(default_factory=KernelConfig)

    def child(self, name: str | int) -> ModelContext:
        """The context of a submodule `name` (its prefix extended)."""
        prefix = f"{self.prefix}.{name}" if self.prefix else str(name)
        return dataclasses.replace(self, prefix=prefix)


def make_context(
    hf_config: Any,
    attn_backend: type[AttentionBackend],
    kernel_config: KernelConfig | None = None,
    parallel_config: ParallelConfig | None = None,
    quant_config: Any = None,
) -> ModelContext:
    """The root context of a model (prefix ""). Unquantized, the layers still get a config:
    the one that carries the kernel switches (the GEMV)."""
    kernel_config = kernel_config or KernelConfig()
    if quant_config is None:
        from pagedllm.layers.quantization import UnquantizedConfig

        quant_config = UnquantizedConfig(kernel_config.gemv, kernel_config.fused_ops)
    return ModelContext(
        hf_config=hf_config,
        attn_backend=attn_backend,
        quant_config=quant_config,
        parallel_config=parallel_config or ParallelConfig(),
        kernel_config=kernel_config,
    )


def linear_kwargs(ctx: ModelContext, name: str) -> dict[str, Any]:
    """The keywords a linear layer `name` under `ctx` takes: its quantization and prefix."""
    return {"quant_config": ctx.quant_config, "prefix": ctx.child(name).prefix}
