"""The Transformers fallback: a decoder-only causal LM that pagedllm has no model file for, run
through transformers' own modeling code with pagedllm's paged attention.

`TransformersForCausalLM(ctx)` builds the HF `...ForCausalLM` class from the config (in the
engine's dtype, on the device, without initializing the weights) with
`attn_implementation="pagedllm"`: a function registered in transformers' `AttentionInterface`
that hands each HF attention call (q/k/v `[1, heads, T, head_dim]`, rope already applied) to one
pagedllm `Attention` layer, which writes the paged KV cache and attends over it. So the model
serves under the same scheduler as a native one (continuous batching, chunked prefill, prefix
caching, preemption). The name is not in transformers' mask interface, so HF builds no
attention mask: pagedllm's attention does its own causal and paged masking.

Which HF modules attend, and how (heads, KV heads, head dim, scale, sliding window, soft cap, sinks),
is learned by a trace at construction: one 2-token forward in which the registered function
records its callers instead of attending. Each caller gets its `Attention` (held by this
model, in call order, so the worker finds them for the KV cache); a model whose layers do not
all attend through the interface, or that attends in a way pagedllm's attention cannot (not
causal, cross attention, K/V head dim unlike Q's), is refused with a `ValueError`.

Hidden states are the HF base model's last hidden state (the whole flat batch is one
"sequence" of batch size 1, positions given per token); logits come from the HF LM head
(tied or not), with the final soft-cap or scaling of the config applied as HF's forward does.
`load_weights` fills the HF module's own parameter names (the checkpoint's, modulo the base
model prefix); buffers such as rotary `inv_freq` are computed by the modules, not loaded.
"""

from __future__ import annotations

import copy
import logging
import re
from collections.abc import Iterable, Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from pagedllm.attention.layer import Attention
from pagedllm.layers.linear import default_weight_loader
from pagedllm.models.utils import ModelContext

logger = logging.getLogger(__name__)

ATTN_IMPLEMENTATION = "pagedllm"
# The tokens of the construction-time trace (2: so the attention's token axis shows).
_TRACE_TOKENS = 2
# Layer types whose layers attend with pagedllm's attention (transformers' `layer_types`).
_ATTENTION_LAYER_TYPES = frozenset({"full_attention", "sliding_attention"})
# Checkpoint tensors that are buffers the modules compute themselves.
_COMPUTED_BUFFERS = re.compile(r"(rotary_emb|rotary)\.(inv_freq|cos_cached|sin_cached)$")


@dataclass
class _TracedCall:
    """What one HF attention module asked the attention function for, in the trace."""

    module: nn.Module
    num_heads: int
    num_kv_heads: int
    head_dim: int
    scaling: float | None
    sliding_window: int | None
    softcap: float | None
    sinks: torch.Tensor | None  # the module's own parameter (gpt-oss), passed by reference


# The calls recorded while a model is traced (None outside the trace): scoped to the trace.
_TRACE: ContextVar[list[_TracedCall] | None] = ContextVar("pagedllm_hf_trace", default=None)


def paged_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature over pagedllm's `Attention`: q `[1, H, T, D]`,
    k/v `[1, KV, T, D]` → `([1, T, H, D], None)`. HF's `attention_mask` is ignored (never built:
    see the module docstring); the layer's own causal/paged masking applies."""
    bound = module.__dict__.get("_pagedllm_attn")
    if bound is None:
        return _record(module, query, key, value, scaling, kwargs)
    attn: Attention = bound[0]
    if isinstance(scaling, float) and scaling != attn.scale:
        raise ValueError(
            f"{type(module).__name__} asked for attention scale {scaling}, but its layer was "
            f"built with {attn.scale}: a scale that changes per call is not supported"
        )
    batch, num_heads, num_tokens, head_dim = query.shape
    if batch != 1:
        raise ValueError(f"the Transformers fallback runs a flat batch (batch size 1), got {batch}")
    q = query[0].transpose(0, 1).reshape(num_tokens, num_heads * head_dim)
    k = key[0].transpose(0, 1).reshape(num_tokens, -1)
    v = value[0].transpose(0, 1).reshape(num_tokens, -1)
    out = attn(q, k, v)
    return out.view(1, num_tokens, num_heads, head_dim), None


def _record(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    scaling: float | None,
    kwargs: dict[str, Any],
) -> tuple[torch.Tensor, None]:
    """The trace's attention: records the caller and returns zeros of the output's shape."""
    calls = _TRACE.get()
    name = type(module).__name__
    if calls is None:
        raise RuntimeError(
            f"{name} attends through the pagedllm attention function but has no pagedllm "
            "Attention layer: it did not attend in the construction-time trace"
        )
    _check_call(name, module, query, key, value, kwargs)
    calls.append(
        _TracedCall(
            module=module,
            num_heads=query.shape[1],
            num_kv_heads=key.shape[1],
            head_dim=query.shape[3],
            scaling=None if scaling is None else float(scaling),
            sliding_window=kwargs.get("sliding_window"),
            softcap=kwargs.get("softcap"),
            sinks=kwargs.get("s_aux"),
        )
    )
    batch, num_heads, num_tokens, head_dim = query.shape
    return query.new_zeros(batch, num_tokens, num_heads, head_dim), None


def _check_call(
    name: str,
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    kwargs: dict[str, Any],
) -> None:
    """Refuses an attention call pagedllm's `Attention` cannot serve."""
    if not getattr(module, "is_causal", True) or kwargs.get("is_causal") is False:
        raise ValueError(f"{name} is not causal attention: the Transformers fallback needs causal")
    if query.dim() != 4 or key.shape[2] != query.shape[2] or query.shape[2] != _TRACE_TOKENS:
        raise ValueError(
            f"{name} attends over keys other than its own tokens (q {tuple(query.shape)}, "
            f"k {tuple(key.shape)}): cross attention or extra keys cannot be paged"
        )
    if key.shape[3] != query.shape[3] or value.shape[3] != query.shape[3]:
        raise ValueError(
            f"{name} has q/k/v head dims {query.shape[3]}/{key.shape[3]}/{value.shape[3]}: "
            "pagedllm's attention needs one head dim"
        )
    if query.shape[1] % key.shape[1]:
        raise ValueError(f"{name}: {query.shape[1]} heads over {key.shape[1]} KV heads")


def register_attention_function() -> None:
    """Registers `paged_attention_forward` as attention implementation "pagedllm" (idempotent).

    NOTE: only in `AttentionInterface`, never in `AttentionMaskInterface`: for an implementation
    the mask interface does not know, transformers' mask builders return None (no 4D mask)."""
    from transformers import AttentionInterface

    AttentionInterface.register(ATTN_IMPLEMENTATION, paged_attention_forward)


def hf_causal_lm_class(hf_config: Any) -> type[nn.Module]:
    """The transformers class of the config: its first `architectures` entry that transformers
    knows as a causal LM, else the causal LM of its `model_type`."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    known = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    for arch in getattr(hf_config, "architectures", None) or []:
        if arch in known and hasattr(transformers, arch):
            return getattr(transformers, arch)
    model_type = str(getattr(hf_config, "model_type", None))
    if model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return getattr(transformers, MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[model_type])
    raise ValueError(
        f"transformers has no causal LM for architectures "
        f"{getattr(hf_config, 'architectures', None)} (model_type {model_type!r})"
    )


def _transformers_config(hf_config: Any) -> Any:
    """A private transformers config (`from_config` writes into the config it is given)."""
    from pagedllm.transformers_utils.config import HFConfig

    if isinstance(hf_config, HFConfig):
        return hf_config.to_transformers()
    return copy.deepcopy(hf_config)


def _check_config(config: Any, hf_cls: type[nn.Module]) -> None:
    """Refuses, with the reason, a model the fallback cannot run."""
    name = hf_cls.__name__
    if getattr(config, "is_encoder_decoder", False):
        raise ValueError(f"{name} is an encoder-decoder model: the Transformers fallback runs "
                         "decoder-only causal LMs")  # fmt: skip
    if not getattr(config, "is_causal", True):
        raise ValueError(f"{name}'s config says is_causal=False: the fallback needs causal LMs")
    if getattr(config, "quantization_config", None) is not None:
        raise ValueError(f"{name} is quantized: the Transformers fallback runs unquantized models")
    if getattr(config, "sub_configs", None):
        raise ValueError(
            f"{name} is a composite (e.g. multimodal) model with sub-configs "
            f"{sorted(config.sub_configs)}: the Transformers fallback runs text-only causal LMs"
        )
    is_backend_compatible = getattr(hf_cls, "is_backend_compatible", None)
    if is_backend_compatible is None or not is_backend_compatible():
        raise ValueError(
            f"{name}'s attention does not go through transformers' attention interface "
            "(`_supports_attention_backend` is not set): the Transformers fallback cannot run it"
        )
    layer_types = getattr(config, "layer_types", None) or []
    others = sorted(set(layer_types) - _ATTENTION_LAYER_TYPES)
    if others:
        raise ValueError(
            f"{name} has layers of types {others}: the Transformers fallback runs attention "
            "layers only (full or sliding)"
        )


def _log_fallback(config: Any, hf_cls: type[nn.Module]) -> None:
    """Says at start-up that the fallback runs the model, and why: a warning when pagedllm has
    no model file for the architecture, info when one was passed over (model_impl)."""
    from pagedllm.models.registry import supported_architectures

    arch = (getattr(config, "architectures", None) or [hf_cls.__name__])[0]
    native = arch in supported_architectures()
    logger.log(
        logging.INFO if native else logging.WARNING,
        "%s: %s; serving it with the Transformers fallback: transformers' %s modeling code "
        "with pagedllm's paged attention (no fused kernels: slower than a native model)",
        arch,
        "model_impl='transformers'" if native else "no native pagedllm model",
        hf_cls.__name__,
    )


class TransformersForCausalLM(nn.Module):
    """An HF causal LM over a flat batch of tokens, attention paged; see the module docstring."""

    def __init__(self, ctx: ModelContext) -> None:
        super().__init__()
        config = _transformers_config(ctx.hf_config)
        hf_cls = hf_causal_lm_class(config)
        _check_config(config, hf_cls)
        _log_fallback(config, hf_cls)
        register_attention_function()
        from transformers.initialization import no_init_weights

        # NOTE: built where load_model builds (its device, its default dtype), uninitialized:
        # the loader fills every parameter; module-computed buffers (rotary) are made here.
        with no_init_weights():
            model = hf_cls._from_config(  # type: ignore[attr-defined]
                config, attn_implementation=ATTN_IMPLEMENTATION, dtype=torch.get_default_dtype()
            )
        model.tie_weights()  # NOTE: no_init_weights skips the tying init_weights would do
        self.model = model.eval()
        self.config = model.config
        text_config = model.config.get_text_config()
        self.final_logit_softcapping = getattr(text_config, "final_logit_softcapping", None)
        self.logit_scale = getattr(text_config, "logit_scale", None)
        self.logits_scaling = getattr(text_config, "logits_scaling", None)
        self.attn = nn.ModuleList(self._bind_attention(ctx, text_config))

    # ----- construction -----

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        # NOTE: embeddings go in, not ids: with ids, HF checks them for padding on the host
        # (a sync each step, and an error in a CUDA graph capture).
        return self.model.get_input_embeddings()(input_ids)

    def _trace(self) -> list[_TracedCall]:
        """The attention calls of one forward pass, in order (see the module docstring)."""
        device = self.model.get_input_embeddings().weight.device
        ids = torch.zeros(_TRACE_TOKENS, dtype=torch.long, device=device)
        calls: list[_TracedCall] = []
        token = _TRACE.set(calls)
        try:
            with torch.inference_mode():
                self._body(ids, torch.arange(_TRACE_TOKENS, device=device))
        finally:
            _TRACE.reset(token)
        return calls

    def _bind_attention(self, ctx: ModelContext, text_config: Any) -> Iterator[Attention]:
        """One `Attention` per HF module that attends, bound to it; refuses what cannot page."""
        calls = self._trace()
        name = type(self.model).__name__
        modules = [c.module for c in calls]
        if len({id(m) for m in modules}) != len(modules):
            raise ValueError(f"{name} calls one attention module more than once per forward "
                             "(shared layers): its KV cache cannot be paged per layer")  # fmt: skip
        num_layers = getattr(text_config, "num_hidden_layers", None)
        if not calls or (num_layers is not None and len(calls) != num_layers):
            raise ValueError(
                f"{name} attended through transformers' attention interface in {len(calls)} of "
                f"its {num_layers} layers: the Transformers fallback needs every layer to"
            )
        names = {id(m): n for n, m in self.model.named_modules()}
        for call in calls:
            module_name = names[id(call.module)]
            attn = Attention(
                call.num_heads,
                call.head_dim,
                call.head_dim**-0.5 if call.scaling is None else call.scaling,
                call.num_kv_heads,
                ctx.attn_backend,
                rotary_emb=None,  # NOTE: HF applies rope before calling the interface
                sliding_window=self._sliding_window(call, text_config),
                logits_soft_cap=float(call.softcap) if call.softcap else None,
                sinks=call.sinks,
                use_fused=ctx.kernel_config.fused_ops,
                prefix=ctx.child("model").child(module_name).child("attn").prefix,
            )
            # NOTE: a tuple, so nn.Module does not register the layer under the HF module too.
            setattr(call.module, "_pagedllm_attn", (attn,))  # noqa: B010
            yield attn

    @staticmethod
    def _sliding_window(call: _TracedCall, text_config: Any) -> int | None:
        """The window the HF module passed, else the one its `layer_types` entry says."""
        if call.sliding_window:
            return int(call.sliding_window)
        layer_types = getattr(text_config, "layer_types", None)
        layer_idx = getattr(call.module, "layer_idx", None)
        window = getattr(text_config, "sliding_window", None)
        if layer_types and isinstance(layer_idx, int) and window:
            return int(window) if layer_types[layer_idx] == "sliding_attention" else None
        return None

    # ----- the runner's interface -----

    def _body(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        out = self.model.base_model(
            inputs_embeds=self._embed(input_ids)[None],
            position_ids=positions[None],
            use_cache=False,
            return_dict=True,
        )
        return out.last_hidden_state[0]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`input_ids [T]`, `positions [T]` → hidden states `[T, hidden_size]`."""
        return self._body(input_ids, positions)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """`[N, hidden_size]` → logits `[N, vocab_size]` in the model dtype."""
        logits = self.model.get_output_embeddings()(hidden_states)
        if self.logit_scale is not None:  # Cohere
            logits = logits * self.logit_scale
        if self.logits_scaling is not None:  # Granite
            logits = logits / self.logits_scaling
        if self.final_logit_softcapping is not None:  # Gemma 2/3
            cap = self.final_logit_softcapping
            logits = torch.tanh(logits / cap) * cap
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Loads HF-named checkpoint tensors into the HF module's parameters (and persistent
        buffers), renamed as transformers renames them (`_CheckpointNames`); returns the names
        of the parameters filled (a tied one under its first name)."""
        params = dict(self.model.named_parameters(remove_duplicate=False))
        first_name = {id(p): f"model.{n}" for n, p in self.model.named_parameters()}
        buffers = self._persistent_buffers()
        names = _CheckpointNames(self.model)
        loaded: set[str] = set()
        for name, tensor in weights:
            target = names.target(name)
            if target in buffers:
                if buffers[target].shape != tensor.shape:
                    raise ValueError(
                        f"checkpoint buffer {name!r}: shape {tuple(tensor.shape)}, "
                        f"buffer {tuple(buffers[target].shape)}"
                    )
                buffers[target].copy_(tensor)
                continue
            if target not in params:
                # NOTE: as in transformers, the ignore list applies to unexpected names only.
                if _COMPUTED_BUFFERS.search(name) or names.ignored(name):
                    continue
                raise ValueError(
                    f"checkpoint tensor {name!r} has no parameter in {type(self.model).__name__}"
                )
            param = params[target]
            try:
                default_weight_loader(param, tensor)
            except ValueError as e:
                raise ValueError(f"checkpoint tensor {name!r}: {e}") from e
            loaded.add(first_name[id(param)])
        return loaded

    def _persistent_buffers(self) -> dict[str, torch.Tensor]:
        """The HF model's buffers that its checkpoints hold, by name."""
        buffers: dict[str, torch.Tensor] = {}
        for module_name, module in self.model.named_modules():
            for name, buf in module.named_buffers(recurse=False):
                if name not in module._non_persistent_buffers_set:
                    buffers[f"{module_name}.{name}" if module_name else name] = buf
        return buffers


class _CheckpointNames:
    """Checkpoint names → the HF model's state-dict names, as `from_pretrained` maps them:
    transformers' renamings for the model (legacy names such as GPT-NeoX's `embed_out`), and
    the base model's prefix added or dropped (a checkpoint of the base model alone).

    A name that transformers' loader would convert (merge per-expert MoE weights, split, ...)
    is refused: the fallback copies tensors as they are."""

    def __init__(self, model: nn.Module) -> None:
        self.model_name = type(model).__name__
        self.prefix = getattr(model, "base_model_prefix", None) or None
        self.state = model.state_dict()
        self.ignore = [
            re.compile(p) for p in getattr(model, "_keys_to_ignore_on_load_unexpected", None) or []
        ]
        self.renamings: list[Any] = []
        self.converters: list[Any] = []
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import (
                WeightConverter,
                WeightRenaming,
                rename_source_key,
            )
        except ImportError:  # NOTE: transformers without weight conversions: names as they are
            self._rename = None
            return
        for transform in get_model_conversion_mapping(model):  # type: ignore[arg-type]
            if isinstance(transform, WeightRenaming):
                self.renamings.append(transform)
            elif isinstance(transform, WeightConverter):
                self.converters.append(transform)
        self._rename = rename_source_key

    def ignored(self, name: str) -> bool:
        """transformers' own list of checkpoint keys its model ignores on load."""
        return any(p.search(name) for p in self.ignore)

    def target(self, name: str) -> str:
        """The HF model's state-dict name that checkpoint tensor `name` fills."""
        if self._rename is None:
            return name
        renamed, converter = self._rename(
            name, self.renamings, self.converters, self.prefix, self.state
        )
        if renamed not in self.state and name in self.state:
            renamed, converter = name, None
        if converter is not None:
            raise ValueError(
                f"checkpoint tensor {name!r} needs transformers' weight conversion ({converter!r} "
                f"of {self.model_name}, e.g. stacking per-expert MoE weights), which the "
                "Transformers fallback does not do: convert the checkpoint to the model's layout"
            )
        return renamed
