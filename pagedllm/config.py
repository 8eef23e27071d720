"""Frozen configuration dataclasses, built once from `EngineArgs` and passed explicitly.

NOTE: this module imports no torch and no transformers: the engine's pure-Python parts read it.
Dtypes are names ("float32", "bfloat16", "float16"); the worker maps them to torch dtypes.
"""

from __future__ import annotations

import importlib.util
import os
import re
from dataclasses import dataclass, field
from typing import Any

SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")
# `ModelConfig.model_impl`: "auto" (the native model file if there is one, else the Transformers
# fallback), "native", "transformers" (the fallback even where a native file exists).
MODEL_IMPLS = ("auto", "native", "transformers")
_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "fp8_e4m3": 1}
# `--kv-cache-dtype` (vLLM's names): "auto" caches K/V in the model dtype; "fp8" (= "fp8_e4m3")
# in FP8 E4M3 with a per-tensor scale per layer and K/V (`Attention.k_scale` / `v_scale`).
KV_CACHE_DTYPES = ("auto", "fp8", "fp8_e4m3")
_KV_CACHE_DTYPE_ALIASES = {"fp8": "fp8_e4m3"}

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "ki": 1024,
    "kib": 1024,
    "mi": 1024**2,
    "mib": 1024**2,
    "gi": 1024**3,
    "gib": 1024**3,
    "ti": 1024**4,
    "tib": 1024**4,
}


def parse_size(value: int | float | str, field_name: str = "size") -> int:
    """Bytes from an int or a string such as "2GiB", "512MiB", "1.5GB" or "4096"."""
    if isinstance(value, bool):
        raise ValueError(f"{field_name} must be a number of bytes or a size string, got {value!r}")
    if isinstance(value, (int, float)):
        size = int(value)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
        unit = match.group(2).lower() if match else None
        if match is None or unit not in _SIZE_UNITS:
            raise ValueError(
                f"{field_name}={value!r} is not a size: use bytes or a string like '2GiB' or '512MB'"
            )
        size = int(float(match.group(1)) * _SIZE_UNITS[unit])
    if size <= 0:
        raise ValueError(f"{field_name} must be positive, got {value!r}")
    return size


def dtype_size(dtype: str) -> int:
    return _DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class ModelConfig:
    """What the model is and how it is shaped. `hf_config` is the transformers config object."""

    model: str
    tokenizer: str | None
    dtype: str
    max_model_len: int
    seed: int
    load_format: str
    architecture: str
    vocab_size: int
    hidden_size: int
    num_layers: int
    num_attention_heads: int
    num_kv_heads: int
    head_dim: int
    hf_config: Any = field(compare=False, repr=False)
    eos_token_ids: tuple[int, ...] = ()
    # SamplingParams defaults from the model's generation config (`--generation-config`), e.g.
    # {"temperature": 0.6, "max_tokens": 512}: what a request that leaves a field out gets.
    sampling_defaults: dict[str, Any] = field(default_factory=dict, compare=False)
    # One of MODEL_IMPLS: which implementation runs the model (`models/registry.py`).
    model_impl: str = "auto"
    # A quantization method to apply at load (`--quantization`, e.g. "fp8" on a bf16/fp32
    # checkpoint), or the checkpoint's own method named explicitly; None: the checkpoint's.
    quantization: str | None = None

    def __post_init__(self) -> None:
        if self.model_impl not in MODEL_IMPLS:
            raise ValueError(
                f"model_impl must be one of {', '.join(MODEL_IMPLS)}, got {self.model_impl!r}"
            )

    def kv_bytes_per_token(self) -> int:
        """Bytes of K and V that one token occupies across all layers."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * dtype_size(self.dtype)


@dataclass(frozen=True)
class CacheConfig:
    block_size: int = 16
    enable_prefix_caching: bool = True
    kv_cache_memory: int | None = None  # bytes; the CPU budget (None: a device default)
    gpu_memory_utilization: float = 0.9
    num_gpu_blocks_override: int | None = None
    # One of KV_CACHE_DTYPES (`--kv-cache-dtype`); "fp8" is stored as its full name "fp8_e4m3".
    cache_dtype: str = "auto"

    def __post_init__(self) -> None:
        if self.cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(
                f"kv_cache_dtype must be one of {', '.join(KV_CACHE_DTYPES)}, "
                f"got {self.cache_dtype!r}"
            )
        alias = _KV_CACHE_DTYPE_ALIASES.get(self.cache_dtype, self.cache_dtype)
        object.__setattr__(self, "cache_dtype", alias)
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise ValueError(f"block_size must be a positive power of two, got {self.block_size}")
        if not 0.0 < self.gpu_memory_utilization <= 1.0:
            raise ValueError(
                f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}"
            )
        if self.num_gpu_blocks_override is not None and self.num_gpu_blocks_override < 1:
            raise ValueError("num_gpu_blocks_override must be at least 1")

    def kv_cache_dtype(self, model_dtype: str) -> str:
        """The dtype name the KV cache holds: the model's for "auto", else `cache_dtype`."""
        return model_dtype if self.cache_dtype == "auto" else self.cache_dtype


@dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int
    max_num_batched_tokens: int
    max_model_len: int

    def __post_init__(self) -> None:
        if self.max_num_seqs < 1:
            raise ValueError(f"max_num_seqs must be at least 1, got {self.max_num_seqs}")
        if self.max_num_batched_tokens < 1:
            raise ValueError(
                f"max_num_batched_tokens must be at least 1, got {self.max_num_batched_tokens}"
            )
        if self.max_num_batched_tokens < self.max_num_seqs:
            raise ValueError(
                f"max_num_batched_tokens ({self.max_num_batched_tokens}) must be at least "
                f"max_num_seqs ({self.max_num_seqs}): every running sequence needs a token a step"
            )


EXECUTOR_BACKENDS = ("uni", "mp", "ray")


@dataclass(frozen=True)
class ParallelConfig:
    """How one engine's model is split over ranks (`world_size` = tp × pp processes), and which
    executor runs them: "uni" (the engine's own process; world size 1 only), "mp" (one worker
    process per rank, on this machine) or "ray" (one Ray actor per rank, on a Ray cluster's
    nodes; the `ray` extra); None: "uni" for one rank, "mp" for more or for data
    parallelism (`data_parallel_size` engine cores, each with its own ranks and devices)."""

    tensor_parallel_size: int = 1
    pipeline_parallel_size: int = 1
    data_parallel_size: int = 1
    distributed_executor_backend: str | None = None
    enable_expert_parallel: bool = False
    # Which of the data_parallel_size engine cores this config is (set per core; its workers
    # take the devices `data_parallel_rank × world_size + rank`).
    data_parallel_rank: int = 0

    def __post_init__(self) -> None:
        for name in ("tensor_parallel_size", "pipeline_parallel_size", "data_parallel_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        backend = self.distributed_executor_backend
        if backend not in (None, *EXECUTOR_BACKENDS):
            raise ValueError(
                f"distributed_executor_backend must be one of {', '.join(EXECUTOR_BACKENDS)}, "
                f"got {backend!r}"
            )
        if backend == "ray" and importlib.util.find_spec("ray") is None:
            raise ValueError(
                "distributed_executor_backend='ray' needs Ray, which is not installed: "
                "pip install 'pagedllm[ray]'"
            )
        if not 0 <= self.data_parallel_rank < self.data_parallel_size:
            raise ValueError(
                f"data_parallel_rank {self.data_parallel_rank} outside [0, "
                f"{self.data_parallel_size})"
            )
        if backend == "uni" and self.world_size > 1:
            raise ValueError(
                f"distributed_executor_backend='uni' runs one rank, but tensor_parallel_size × "
                f"pipeline_parallel_size is {self.world_size}: use 'mp'"
            )

    @property
    def world_size(self) -> int:
        return self.tensor_parallel_size * self.pipeline_parallel_size

    @property
    def executor_backend(self) -> str:
        """The executor that runs this config (the default resolved)."""
        if self.distributed_executor_backend is not None:
            return self.distributed_executor_backend
        # NOTE: data-parallel cores put their workers in processes of their own (own devices).
        return "uni" if self.world_size == 1 and self.data_parallel_size == 1 else "mp"


@dataclass(frozen=True)
class DeviceConfig:
    device: str = "cpu"  # "cpu" or "cuda"


def _env_on(name: str) -> bool:
    return os.environ.get(name, "1") != "0"


@dataclass(frozen=True)
class KernelConfig:
    """Which custom kernels the layers use on CUDA (ignored elsewhere): the fused Triton ops
    (norms, rotary, the attention prologue, SiLU-and-mul) and, on top, the small-batch GEMV of
    the linear layers (which needs the fused ops). Defaults: the environment, read when the
    config is made (`PAGEDLLM_FUSED_OPS=0`, `PAGEDLLM_GEMV=0` turn them off)."""

    fused_ops: bool = field(default_factory=lambda: _env_on("PAGEDLLM_FUSED_OPS"))
    gemv: bool = field(default_factory=lambda: _env_on("PAGEDLLM_GEMV"))

    def __post_init__(self) -> None:
        if self.gemv and not self.fused_ops:
            object.__setattr__(self, "gemv", False)  # NOTE: the GEMV is one of the fused ops


# `SpeculativeConfig.method`: the methods known by name; only SPEC_METHODS_SUPPORTED run today.
SPEC_METHODS = ("ngram", "draft_model", "eagle", "eagle3")
SPEC_METHODS_SUPPORTED = ("ngram", "draft_model", "eagle", "eagle3")


@dataclass(frozen=True)
class SpeculativeConfig:
    """Speculative decoding (vLLM's `speculative_config` keys). "ngram" (prompt lookup): each
    decoding request proposes the up-to-`num_speculative_tokens` tokens that followed the last
    earlier occurrence of its longest suffix n-gram (`prompt_lookup_max` down to
    `prompt_lookup_min` tokens); "draft_model": `model` (a folder, or a packaged shape with
    random weights), a smaller model with the target's vocabulary, proposes them (k forwards of
    its own, in the worker, with its own paged KV cache); "eagle" / "eagle3": `model` is an
    EAGLE / EAGLE-3 head checkpoint (the published layouts) that reads the target's hidden
    states (`worker/eagle.py`). The target verifies them in one step."""

    method: str = "ngram"
    num_speculative_tokens: int = 3
    prompt_lookup_min: int = 1
    prompt_lookup_max: int = 4
    model: str | None = None
    # The draft model's config, built by `EngineArgs` from `model` (not a user key).
    draft_model_config: ModelConfig | None = field(default=None, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.method not in SPEC_METHODS:
            raise ValueError(
                f"speculative_config: method must be one of {', '.join(SPEC_METHODS)}, "
                f"got {self.method!r}"
            )
        if self.method not in SPEC_METHODS_SUPPORTED:
            raise ValueError(
                f"speculative_config: method {self.method!r} is not supported yet (supported: "
                f"{', '.join(SPEC_METHODS_SUPPORTED)})"
            )
        for name in ("num_speculative_tokens", "prompt_lookup_min", "prompt_lookup_max"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(
                    f"speculative_config: {name} must be a positive integer, got {value!r}"
                )
        if self.method in ("draft_model", "eagle", "eagle3") and not self.model:
            what = "the draft model's" if self.method == "draft_model" else "the head checkpoint's"
            raise ValueError(
                f"speculative_config: method {self.method!r} needs model ({what} folder, or "
                "a packaged shape)"
            )
        if self.method == "ngram" and self.model is not None:
            raise ValueError("speculative_config: model is not used by method 'ngram'")
        if self.prompt_lookup_min > self.prompt_lookup_max:
            raise ValueError(
                f"speculative_config: prompt_lookup_min ({self.prompt_lookup_min}) must not "
                f"exceed prompt_lookup_max ({self.prompt_lookup_max})"
            )

    @classmethod
    def from_dict(cls, value: dict[str, Any] | str) -> SpeculativeConfig:
        """From `LLM(speculative_config={...})` or `--speculative-config '<json>'`."""
        import dataclasses
        import json

        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError as e:
                raise ValueError(f"speculative_config is not JSON: {e}") from e
        if not isinstance(value, dict):
            raise ValueError("speculative_config must be a JSON object (a dict)")
        known = {f.name for f in dataclasses.fields(cls)} - {"draft_model_config"}
        unknown = sorted(set(value) - known)
        if unknown:
            raise ValueError(
                f"speculative_config: unknown keys {unknown}; known: {', '.join(sorted(known))}"
            )
        if "method" not in value:
            raise ValueError("speculative_config: method is required (e.g. 'ngram')")
        return cls(**value)


@dataclass(frozen=True)
class EngineConfig:
    """Everything one engine needs, in one object."""

    model_config: ModelConfig
    cache_config: CacheConfig
    scheduler_config: SchedulerConfig
    parallel_config: ParallelConfig
    device_config: DeviceConfig
    attention_backend: str | None = None  # None: the best one for the device
    enforce_eager: bool = False
    # Schedule and launch step N+1 before step N's sampled ids reach the host (see EngineCore).
    async_scheduling: bool = False
    kernel_config: KernelConfig = field(default_factory=KernelConfig)
    max_logprobs: int = 20
    # The model's reasoning markers (`structured_output.REASONING_MARKERS`; None: it has none).
    reasoning_parser: str | None = None
    max_n: int = 128
    max_stop_strings: int = 64
    disable_log_stats: bool = True
    # Speculative decoding (None: off). NOTE: on, the engine core steps synchronously.
    speculative_config: SpeculativeConfig | None = None

    def __post_init__(self) -> None:
        for name in ("max_logprobs", "max_n", "max_stop_strings"):
            if getattr(self, name) < (0 if name == "max_logprobs" else 1):
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        from pagedllm.engine.structured_output.reasoning import REASONING_MARKERS

        if self.reasoning_parser is not None and self.reasoning_parser not in REASONING_MARKERS:
            raise ValueError(
                f"reasoning_parser must be one of {', '.join(REASONING_MARKERS)}, got "
                f"{self.reasoning_parser!r}"
            )

    @property
    def request_limits(self) -> Any:
        """The `RequestLimits` every request is checked against (offline and served alike)."""
        from pagedllm.sampling_params import RequestLimits

        return RequestLimits(
            vocab_size=self.model_config.vocab_size,
            max_logprobs=self.max_logprobs,
            max_n=self.max_n,
            max_stop_strings=self.max_stop_strings,
        )
