"""`ModelContext`: what a model's constructors need besides the HF config, in one object.

A model class is built as `Model(ctx)`; each module passes `ctx.child("name")` to the modules it
builds, so every layer knows its dotted name (`model.layers.3.self_attn.qkv_proj`: what a
quantization config's ignore list or a per-layer setting is keyed by), the attention backend,
the quantization config, the parallel config and the kernel switches, without threading each of
them through every constructor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from pagedllm.config import KernelConfig, ParallelConfig
from pagedllm.distributed import get_pp_group

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
    else:  # NOTE: a quantized checkpoint's methods follow the engine's GEMV switch too
        object.__setattr__(quant_config, "use_gemv", kernel_config.gemv)
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


# ----- pipeline parallelism -----


class PPMissingLayer(nn.Module):
    """A module another pipeline stage holds: it has no parameters, and a stage never calls it
    (the loader skips its checkpoint tensors: `pp_missing`)."""

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        raise RuntimeError("a layer of another pipeline stage was called")


@dataclass
class IntermediateTensors:
    """What a pipeline stage hands the next one: the hidden states and the residual stream."""

    hidden_states: torch.Tensor
    residual: torch.Tensor


def pp_layer_range(num_layers: int) -> tuple[int, int]:
    """[start, end) of the decoder layers this rank's pipeline stage holds: an even split,
    the earlier stages taking one more when it does not divide (they also hold the embedding,
    the later ones the LM head: about even either way)."""
    pp = get_pp_group()
    size, rank = pp.world_size, pp.rank_in_group
    if num_layers < size:
        raise ValueError(
            f"pipeline_parallel_size={size} is larger than the model's {num_layers} layers"
        )
    base, extra = divmod(num_layers, size)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


def pp_missing(model: nn.Module, name: str) -> bool:
    """Whether the checkpoint tensor `name` belongs to a module of another pipeline stage."""
    module: Any = model
    for part in name.split(".")[:-1]:
        module = getattr(module, part, None)
        if module is None:
            return False
        if isinstance(module, PPMissingLayer):
            return True
    return False


def pp_filter(
    model: nn.Module, weights: Iterable[tuple[str, torch.Tensor]]
) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint tensors of this pipeline stage's modules. A last stage that does not
    embed gets the embedding as its tied LM head (`tie_word_embeddings`)."""
    tied = bool(getattr(model, "tie_word_embeddings", False))
    for name, tensor in weights:
        if tied and name == "model.embed_tokens.weight" and pp_missing(model, name):
            name = "lm_head.weight"
        if not pp_missing(model, name):
            yield name, tensor
