"""The model's HF-style config, from a checkpoint folder or a bare config.json.

Why not just `AutoConfig`: importing transformers' config machinery costs ~2-3 s on a small CPU
(it imports torch.distributed, dynamo and hundreds of modules), more than the rest of a warm
start-up together. For the architectures pagedllm runs (llama, mistral, qwen2, qwen3) the config
is read here instead, with the defaults and the post-processing that transformers' config classes
apply (tests/test_transformers_utils.py pins every attribute pagedllm reads against AutoConfig).
Anything else (another model_type, remote code, nested per-layer rope settings, sub-configs)
goes to AutoConfig as before.

NOTE: the defaults below are transformers 5's (LlamaConfig, MistralConfig, Qwen2Config,
Qwen3Config). `dtype` stays a string ("bfloat16"), where transformers makes it a torch.dtype.
"""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

_COMMON: dict[str, Any] = {
    "architectures": None,
    "dtype": None,
    "hidden_act": "silu",
    "initializer_range": 0.02,
    "rms_norm_eps": 1e-6,
    "use_cache": True,
    "pad_token_id": None,
    "tie_word_embeddings": False,
    "rope_parameters": None,
    "attention_dropout": 0.0,
}

# Each model type's own field defaults (on top of _COMMON).
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 11008,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": None,
        "max_position_embeddings": 2048,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "pretraining_tp": 1,
        "attention_bias": False,
        "mlp_bias": False,
        "head_dim": None,
    },
    "mistral": {
        "vocab_size": 32000,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": None,
        "max_position_embeddings": 4096 * 32,
        "bos_token_id": 1,
        "eos_token_id": 2,
        # NOTE: a Mistral config.json without the key slides over 4096 tokens in every layer.
        "sliding_window": 4096,
    },
    "qwen2": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "max_position_embeddings": 32768,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
        "layer_types": None,
        "bos_token_id": None,
        "eos_token_id": None,
    },
    "qwen3": {
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 22016,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "head_dim": 128,
        "max_position_embeddings": 32768,
        "attention_bias": False,
        "use_sliding_window": False,
        "sliding_window": 4096,
        "max_window_layers": 28,
        "layer_types": None,
        "bos_token_id": None,
        "eos_token_id": None,
    },
}

SUPPORTED_MODEL_TYPES = frozenset(_DEFAULTS)
_DEFAULT_ROPE_THETA = 10000.0
_LEGACY_LAYER_TYPES = {"attention": "full_attention", "mamba": "linear_attention"}
_ROPE_TYPES_WITH_ORIGINAL_LEN = ("llama3", "yarn", "longrope")
_LAYER_TYPE_KEYS = frozenset({"full_attention", "sliding_attention", "chunked_attention"})
_POSITIVE_INT_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
)


class _Unsupported(Exception):
    """This config needs transformers' own class (reason in the message)."""


class HFConfig:
    """A transformers-like config: plain attributes, as `AutoConfig` would set them.

    `rope_scaling` and `torch_dtype` are aliases of `rope_parameters` and `dtype`, as in
    transformers 5. `to_transformers()` builds the real transformers config (for HF baselines).
    """

    def __init__(self, attrs: dict[str, Any]) -> None:
        self.__dict__.update(attrs)

    @property
    def rope_scaling(self) -> dict[str, Any] | None:
        return self.__dict__.get("rope_parameters")

    @property
    def torch_dtype(self) -> str | None:
        return self.__dict__.get("dtype")

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    def to_transformers(self) -> Any:
        """The same config as a transformers `PretrainedConfig` (imports transformers)."""
        from transformers import AutoConfig

        data = self.to_dict()
        data.pop("_name_or_path", None)
        return AutoConfig.for_model(**data)

    def __repr__(self) -> str:
        return f"HFConfig({json.dumps(self.__dict__, sort_keys=True, default=str)})"


def to_transformers_config(hf_config: Any) -> Any:
    """A transformers config for `hf_config` (ours or already transformers')."""
    return hf_config.to_transformers() if isinstance(hf_config, HFConfig) else hf_config


def get_hf_config(model_path: str) -> Any:
    """The config of an HF folder or a bare config .json: ours where we know the model type
    (see the module docstring), else transformers' `AutoConfig`."""
    is_json = model_path.endswith(".json")
    config_file = Path(model_path) if is_json else Path(model_path) / "config.json"
    try:
        data = json.loads(config_file.read_text())
    except FileNotFoundError:
        data = None
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"cannot read the model config {config_file}: {e}") from e
    if isinstance(data, dict):
        try:
            config = parse_hf_config(data)
            if not is_json:
                config.__dict__["_name_or_path"] = model_path
            return config
        except _Unsupported as e:
            logger.debug("config of %s goes through transformers: %s", model_path, e)
    return _auto_config(model_path, data if is_json else None)


def _auto_config(model_path: str, data: Any) -> Any:
    from transformers import AutoConfig

    if model_path.endswith(".json"):
        if not isinstance(data, dict):
            raise ValueError(f"{model_path} is not a JSON object")
        return AutoConfig.for_model(**data)
    return AutoConfig.from_pretrained(model_path)


def parse_hf_config(data: dict[str, Any]) -> HFConfig:
    """config.json's dict → HFConfig with transformers' defaults and post-processing applied.
    Raises _Unsupported for what only transformers' classes can read."""
    model_type = data.get("model_type")
    if model_type not in _DEFAULTS:
        raise _Unsupported(f"model_type {model_type!r}")
    for key in ("auto_map", "per_layer_config", "text_config", "sub_configs"):
        if key in data:
            raise _Unsupported(f"config has {key!r}")
    kwargs = copy.deepcopy(data)
    kwargs.pop("model_type")
    attrs: dict[str, Any] = dict(_COMMON)
    attrs.update(_DEFAULTS[model_type])
    for key in list(kwargs):
        if key in attrs:
            attrs[key] = kwargs.pop(key)
    _post_init_model(model_type, attrs)
    torch_dtype = kwargs.pop("torch_dtype", None)
    if attrs["dtype"] is None and torch_dtype is not None:
        attrs["dtype"] = torch_dtype
    if attrs["dtype"] is not None:
        attrs["dtype"] = str(attrs["dtype"]).removeprefix("torch.")
    _standardize_rope(attrs, kwargs)
    for key in ("name_or_path", "_commit_hash", "output_attentions", "attn_implementation"):
        kwargs.pop(key, None)
    attrs.update(kwargs)  # keys the class does not declare become plain attributes
    if attrs.get("layer_types") is not None:
        attrs["layer_types"] = [_LEGACY_LAYER_TYPES.get(t, t) for t in attrs["layer_types"]]
    attrs["model_type"] = model_type
    _validate(attrs)
    return HFConfig(attrs)


def _post_init_model(model_type: str, attrs: dict[str, Any]) -> None:
    """The model config classes' own `__post_init__`."""
    if model_type in ("qwen2", "qwen3"):
        if not attrs["use_sliding_window"]:
            attrs["sliding_window"] = None
    elif attrs["head_dim"] is None and isinstance(attrs["num_attention_heads"], int):
        attrs["head_dim"] = attrs["hidden_size"] // max(attrs["num_attention_heads"], 1)
    if attrs["num_key_value_heads"] is None:
        attrs["num_key_value_heads"] = attrs["num_attention_heads"]
    if model_type in ("qwen2", "qwen3") and attrs["layer_types"] is None:
        window, first = attrs["sliding_window"], attrs["max_window_layers"]
        attrs["layer_types"] = [
            "sliding_attention" if window is not None and i >= first else "full_attention"
            for i in range(attrs["num_hidden_layers"])
        ]


def _standardize_rope(attrs: dict[str, Any], kwargs: dict[str, Any]) -> None:
    """transformers 5 moves `rope_theta`, `rope_scaling` and `partial_rotary_factor` into one
    `rope_parameters` dict (with `rope_type`); the old top-level keys are not attributes."""
    rope_scaling = kwargs.pop("rope_scaling", None)
    params = rope_scaling or attrs["rope_parameters"]
    params = dict(params) if params is not None else {}
    if _LAYER_TYPE_KEYS & set(params):
        raise _Unsupported("rope parameters per layer type")
    params.setdefault("rope_theta", kwargs.pop("rope_theta", _DEFAULT_ROPE_THETA))
    partial_rotary_factor = kwargs.pop("partial_rotary_factor", None)
    if partial_rotary_factor is not None:
        params.setdefault("partial_rotary_factor", partial_rotary_factor)
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in _ROPE_TYPES_WITH_ORIGINAL_LEN:
        params.setdefault("original_max_position_embeddings", attrs["max_position_embeddings"])
    attrs["rope_parameters"] = params


def _validate(attrs: dict[str, Any]) -> None:
    for name in _POSITIVE_INT_FIELDS:
        value = attrs.get(name)
        if name == "head_dim" and value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"model config: {name} must be a positive integer, got {value!r}")
    layer_types = attrs.get("layer_types")
    if layer_types is not None and len(layer_types) != attrs["num_hidden_layers"]:
        raise ValueError(
            f"model config: layer_types has {len(layer_types)} entries for "
            f"num_hidden_layers={attrs['num_hidden_layers']}"
        )
