"""The checkpoint side of an FP8 KV cache, in plain Python (no torch): which checkpoint tensors
are a layer's K/V cache scales, and whether a compressed-tensors `kv_cache_scheme` is one this
engine's FP8 cache computes.

Checkpoints name a layer's scales as vLLM's loaders accept them (`maybe_remap_kv_scale_name`,
compressed-tensors' `get_cache_scale`), each under the layer's attention block `P` (e.g.
`model.layers.3.self_attn`):
- `P.k_scale`, `P.v_scale` (llm-compressor's `kv_cache_scheme`, vLLM's own `P.attn.k_scale`);
- `P.k_proj.k_scale`, `P.v_proj.v_scale` (ModelOpt);
- `P.k_proj.output_scale`, `P.v_proj.output_scale` (older compressed-tensors: the K/V
  projections' output quantization);
- `P.kv_scale` (deprecated: one scale for both).
Query and probability scales (`P.q_scale`, `P.prob_scale`, `P.q_proj.output_scale`) belong to
FP8 attention math this engine does not do (queries stay in the model dtype): they are dropped.
"""

from __future__ import annotations

from typing import Any

# (name suffix, which scales it sets: "k", "v", "kv" or "" = dropped), longest suffixes first.
_SUFFIXES: tuple[tuple[str, str], ...] = (
    (".k_proj.output_scale", "k"),
    (".v_proj.output_scale", "v"),
    (".q_proj.output_scale", ""),
    (".k_proj.k_scale", "k"),
    (".v_proj.v_scale", "v"),
    (".kv_scale", "kv"),
    (".k_scale", "k"),
    (".v_scale", "v"),
    (".q_scale", ""),
    (".prob_scale", ""),
)


def kv_scale_target(name: str) -> tuple[str, str] | None:
    """`(attention block prefix, "k" | "v" | "kv" | "")` when checkpoint tensor `name` is a KV
    cache scale (or a dropped attention scale: ""), None for any other tensor."""
    for suffix, which in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)], which
    return None


def check_kv_cache_scheme(hf_config: Any, cache_dtype: str) -> None:
    """A `ValueError` when the checkpoint's compressed-tensors `kv_cache_scheme` describes scales
    an FP8 E4M3 cache with one static scale per tensor cannot use (only checked when the cache
    is FP8: with "auto" the scales are not read)."""
    if not cache_dtype.startswith("fp8"):
        return
    quant = getattr(hf_config, "quantization_config", None)
    if quant is not None and not isinstance(quant, dict):
        quant = quant.to_dict() if hasattr(quant, "to_dict") else vars(quant)
    scheme = (quant or {}).get("kv_cache_scheme")
    if not scheme:
        return
    wanted = {"type": "float", "num_bits": 8, "strategy": "tensor", "dynamic": False}
    wrong = {
        key: scheme.get(key)
        for key, value in wanted.items()
        if scheme.get(key, False if key == "dynamic" else None) != value
    }
    if scheme.get("symmetric", True) is not True:
        wrong["symmetric"] = scheme.get("symmetric")
    if wrong:
        raise ValueError(
            f"kv_cache_dtype={cache_dtype!r}: the checkpoint's kv_cache_scheme {scheme} is not "
            f"supported ({', '.join(f'{k}={v!r}' for k, v in wrong.items())}); the FP8 cache "
            "takes static symmetric 8-bit float scales per tensor (use kv_cache_dtype='auto')"
        )
