"""EngineArgs: the one source of engine options for `LLM(**kwargs)` and the CLI flags.

Field names are vLLM's; each becomes a flag (`max_model_len` → `--max-model-len`).
`create_engine_config()` reads the model's HF config and resolves every default once.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagedllm.config import (
    SUPPORTED_DTYPES,
    CacheConfig,
    DeviceConfig,
    EngineConfig,
    KernelConfig,
    ModelConfig,
    ParallelConfig,
    SchedulerConfig,
    SpeculativeConfig,
    parse_size,
)
from pagedllm.config_checks import (
    check_eagle_head,
    check_pipeline_parallel,
    check_tensor_parallel,
)
from pagedllm.transformers_utils.config import get_hf_config

logger = logging.getLogger(__name__)

LOAD_FORMATS = ("auto", "safetensors", "dummy", "gguf")
CONFIGS_DIR = Path(__file__).parent / "configs"
DEFAULT_MAX_NUM_SEQS = 256
DEFAULT_MAX_NUM_BATCHED_TOKENS = 8192
# vLLM's defaults for GPUs of >= 70 GiB other than the A100 (an H100 or H200): more sequences per
# step, and for the offline `LLM` twice the tokens (fewer, larger prompt steps; a server keeps
# 8192 to bound the decode stall a prompt chunk causes).
LARGE_GPU_MAX_NUM_SEQS = 1024
LARGE_GPU_OFFLINE_MAX_NUM_BATCHED_TOKENS = 16384
# vLLM's CPU budgets: a step of 8192 prompt tokens takes over a minute on a small CPU, and every
# request's next token waits for it; a server chunks by 2048 (~15 s a step at 8k context on 2
# cores), the offline engine by 4096.
CPU_MAX_NUM_BATCHED_TOKENS = {"server": 2048, "offline": 4096}


def _help(text: str) -> dict[str, Any]:
    return {"help": text}


@dataclass
class EngineArgs:
    model: str | None = field(
        default=None,
        metadata=_help(
            "HF model folder, a .gguf file, or a config .json (with --load-format dummy)"
        ),
    )
    tokenizer: str | None = field(default=None, metadata=_help("tokenizer folder (default: model)"))
    skip_tokenizer_init: bool = field(default=False, metadata=_help("no tokenizer: token ids only"))
    dtype: str = field(default="auto", metadata=_help("auto, float32, bfloat16 or float16"))
    max_model_len: int | None = field(
        default=None, metadata=_help("context length (prompt + output)")
    )
    max_num_seqs: int | None = field(default=None, metadata=_help("most sequences in one step"))
    max_num_batched_tokens: int | None = field(
        default=None, metadata=_help("most tokens in one step")
    )
    block_size: int = field(default=16, metadata=_help("tokens per KV-cache block"))
    enable_prefix_caching: bool = field(default=True, metadata=_help("reuse KV of shared prefixes"))
    kv_cache_memory: int | str | None = field(
        default=None, metadata=_help("KV-cache budget in bytes or like '2GiB' (CPU default 4GiB)")
    )
    gpu_memory_utilization: float = field(
        default=0.9, metadata=_help("fraction of GPU memory for weights, activations and KV cache")
    )
    kv_cache_dtype: str = field(
        default="auto",
        metadata=_help(
            "auto (the model dtype) or fp8 (= fp8_e4m3: FP8 K/V with per-tensor scales, 1.0 or "
            "the checkpoint's k_scale/v_scale): twice the tokens in the same memory"
        ),
    )
    num_gpu_blocks_override: int | None = field(
        default=None, metadata=_help("exact number of KV blocks (testing)")
    )
    seed: int = field(default=0, metadata=_help("random seed"))
    load_format: str = field(default="auto", metadata=_help("auto, safetensors, gguf or dummy"))
    quantization: str | None = field(
        default=None,
        metadata=_help(
            "quantize at load (fp8: FP8 weights and activations), or the checkpoint's own method "
            "(default: the checkpoint's quantization_config, if any)"
        ),
    )
    model_impl: str = field(
        default="auto",
        metadata=_help(
            "auto (pagedllm's model file, else transformers' modeling code with paged attention), "
            "native, or transformers (the Transformers fallback, even where a model file exists)"
        ),
    )
    device: str = field(default="auto", metadata=_help("auto, cpu or cuda"))
    attention_backend: str | None = field(
        default=None, metadata=_help("torch, triton (default: best)")
    )
    enforce_eager: bool = field(default=False, metadata=_help("no CUDA graphs"))
    fused_ops: bool | None = field(
        default=None,
        metadata=_help(
            "fused Triton kernels on CUDA: norms, rotary, the attention prologue, SiLU-and-mul "
            "(default: on, unless PAGEDLLM_FUSED_OPS=0)"
        ),
    )
    gemv: bool | None = field(
        default=None,
        metadata=_help(
            "the Triton GEMV for linears of a few rows on CUDA (default: on, unless "
            "PAGEDLLM_GEMV=0 or the fused kernels are off)"
        ),
    )
    async_scheduling: bool | None = field(
        default=None,
        metadata=_help("prepare the next step while the GPU runs this one (default: on for CUDA)"),
    )
    reasoning_parser: str | None = field(
        default=None,
        metadata=_help(
            "the model reasons between <think> and </think> (deepseek_r1, qwen3): structured "
            "output applies after the reasoning; the server splits it into reasoning_content"
        ),
    )
    max_logprobs: int = field(default=20, metadata=_help("most logprobs a request may ask for"))
    max_n: int = field(default=128, metadata=_help("most samples (n) a request may ask for"))
    max_stop_strings: int = field(
        default=64, metadata=_help("most stop strings (and bad words) a request may give")
    )
    generation_config: str = field(
        default="auto",
        metadata=_help(
            "sampling defaults for what a request leaves out: 'auto' (the model's "
            "generation_config.json), 'vllm' (none), or a folder holding a generation_config.json"
        ),
    )
    override_generation_config: dict[str, Any] | str | None = field(
        default=None,
        metadata=_help(
            "generation-config fields that win over the file, as JSON, e.g. "
            '\'{"temperature": 0.5, "max_new_tokens": 256}\''
        ),
    )
    tensor_parallel_size: int = field(
        default=1, metadata=_help("ranks (GPUs) each layer is split over")
    )
    pipeline_parallel_size: int = field(
        default=1, metadata=_help("pipeline stages the layers are split into (a rank set each)")
    )
    data_parallel_size: int = field(
        default=1,
        metadata=_help("engine cores, each a full model replica on its own devices (DP)"),
    )
    distributed_executor_backend: str | None = field(
        default=None,
        metadata=_help(
            "'uni' (one rank, in the engine's process), 'mp' (a worker process per rank) or "
            "'ray' (a Ray actor per rank, on a Ray cluster's nodes: pip install "
            "'pagedllm[ray]'); default: uni for one rank, mp for more"
        ),
    )
    enable_expert_parallel: bool = field(
        default=False,
        metadata=_help("split MoE layers' experts over the tensor-parallel ranks, not each expert"),
    )
    disable_log_stats: bool = field(default=True, metadata=_help("no periodic stats in the log"))
    speculative_config: dict[str, Any] | str | None = field(
        default=None,
        metadata=_help(
            'speculative decoding, as JSON with vLLM\'s keys, e.g. \'{"method": "ngram", '
            '"num_speculative_tokens": 3, "prompt_lookup_max": 4}\', or \'{"method": "draft_model", '
            '"model": "<folder>", "num_speculative_tokens": 4}\''
        ),
    )
    # NOTE: not a flag: `LLM` sets "offline", which picks the offline scheduler defaults.
    usage_context: str = field(default="server", metadata={"cli": False})

    # ----- CLI -----

    @classmethod
    def add_cli_args(cls, parser: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
        for f in dataclasses.fields(cls):
            if f.name in skip or not f.metadata.get("cli", True):
                continue
            flag = "--" + f.name.replace("_", "-")
            help_text = f.metadata.get("help", "")
            if f.type in ("bool", bool, "bool | None"):
                parser.add_argument(
                    flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_text
                )
            else:
                parser.add_argument(flag, type=_cli_type(f.type), default=f.default, help=help_text)

    @classmethod
    def from_cli_args(cls, ns: argparse.Namespace) -> EngineArgs:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in vars(ns).items() if k in names})

    # ----- config -----

    def create_engine_config(self) -> EngineConfig:
        device = _resolve_device(self.device)
        model_path, load_format = _resolve_model(self.model, self.load_format)
        hf_config = get_hf_config(model_path)
        model_config = _build_model_config(self, hf_config, model_path, load_format, device)
        default_seqs, default_tokens = _scheduler_defaults(device, self.usage_context)
        max_num_seqs = self.max_num_seqs or default_seqs
        max_num_batched_tokens = self.max_num_batched_tokens or max(default_tokens, max_num_seqs)
        kv_cache_memory = (
            None
            if self.kv_cache_memory is None
            else parse_size(self.kv_cache_memory, "kv_cache_memory")
        )
        check_tensor_parallel(model_config, self.tensor_parallel_size)
        check_pipeline_parallel(model_config, self.pipeline_parallel_size, self.speculative_config)
        from pagedllm.attention.kv_scale_names import check_kv_cache_scheme

        check_kv_cache_scheme(hf_config, self.kv_cache_dtype)
        return EngineConfig(
            model_config=model_config,
            cache_config=CacheConfig(
                block_size=self.block_size,
                enable_prefix_caching=self.enable_prefix_caching,
                kv_cache_memory=kv_cache_memory,
                gpu_memory_utilization=self.gpu_memory_utilization,
                num_gpu_blocks_override=self.num_gpu_blocks_override,
                cache_dtype=self.kv_cache_dtype,
            ),
            scheduler_config=SchedulerConfig(
                max_num_seqs=max_num_seqs,
                max_num_batched_tokens=max_num_batched_tokens,
                max_model_len=model_config.max_model_len,
            ),
            parallel_config=ParallelConfig(
                tensor_parallel_size=self.tensor_parallel_size,
                pipeline_parallel_size=self.pipeline_parallel_size,
                data_parallel_size=self.data_parallel_size,
                distributed_executor_backend=self.distributed_executor_backend,
                enable_expert_parallel=self.enable_expert_parallel,
            ),
            device_config=DeviceConfig(device=device),
            attention_backend=self.attention_backend,
            enforce_eager=self.enforce_eager,
            kernel_config=self._kernel_config(),
            async_scheduling=(
                device == "cuda" if self.async_scheduling is None else self.async_scheduling
            ),
            max_logprobs=self.max_logprobs,
            reasoning_parser=self.reasoning_parser,
            max_n=self.max_n,
            max_stop_strings=self.max_stop_strings,
            disable_log_stats=self.disable_log_stats,
            speculative_config=self._speculative_config(model_config, device),
        )

    def _speculative_config(self, target: ModelConfig, device: str) -> SpeculativeConfig | None:
        """The speculative config; for a draft model or an EAGLE head, with its `ModelConfig`
        (the target's dtype and max_model_len; its vocabulary must be the target's, and an
        EAGLE head's hidden size too)."""
        if self.speculative_config is None:
            return None
        spec = SpeculativeConfig.from_dict(self.speculative_config)
        if spec.method not in ("draft_model", "eagle", "eagle3"):
            return spec
        assert spec.model is not None
        try:
            dummy = self.load_format == "dummy" or not os.path.exists(spec.model)
            path, load_format = _resolve_model(spec.model, "dummy" if dummy else "auto")
            hf_config = get_hf_config(path)
            if spec.method != "draft_model":
                check_eagle_head(spec.method, hf_config, target)
            draft_args = dataclasses.replace(
                self,
                model=path,
                tokenizer=None,
                skip_tokenizer_init=True,
                quantization=None,
                max_model_len=target.max_model_len,
                generation_config="vllm",
                override_generation_config=None,
                speculative_config=None,
            )
            draft = _build_model_config(draft_args, hf_config, path, load_format, device)
        except ValueError as e:
            raise ValueError(f"speculative_config.model={spec.model!r}: {e}") from e
        if draft.vocab_size != target.vocab_size:
            raise ValueError(
                f"speculative_config.model={spec.model!r}: the draft's vocabulary has "
                f"{draft.vocab_size} tokens, the target's {target.vocab_size}: a draft model "
                "needs the target's vocabulary"
            )
        return dataclasses.replace(spec, draft_model_config=draft)

    def _kernel_config(self) -> KernelConfig:
        """The switches given; the environment's (KernelConfig's defaults) for the others."""
        given = {"fused_ops": self.fused_ops, "gemv": self.gemv}
        return KernelConfig(**{k: v for k, v in given.items() if v is not None})


def _cli_type(annotation: Any) -> Any:
    text = str(annotation)
    if text.startswith("int | str"):
        return str  # sizes such as "2GiB"; parse_size reads them
    if "float" in text:
        return float
    if "int" in text:
        return int
    return str


def _scheduler_defaults(device: str, usage_context: str) -> tuple[int, int]:
    """(max_num_seqs, max_num_batched_tokens) when not given: vLLM's choice by device."""
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        if props.total_memory >= 70 * 2**30 and "a100" not in props.name.lower():
            tokens = DEFAULT_MAX_NUM_BATCHED_TOKENS
            if usage_context == "offline":
                tokens = LARGE_GPU_OFFLINE_MAX_NUM_BATCHED_TOKENS
            return LARGE_GPU_MAX_NUM_SEQS, tokens
    if device == "cpu":
        return DEFAULT_MAX_NUM_SEQS, CPU_MAX_NUM_BATCHED_TOKENS[usage_context]
    return DEFAULT_MAX_NUM_SEQS, DEFAULT_MAX_NUM_BATCHED_TOKENS


def _resolve_device(device: str) -> str:
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device must be auto, cpu or cuda, got {device!r}")
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _resolve_model(model: str | None, load_format: str) -> tuple[str, str]:
    """The HF folder (or config JSON) to read, and the load format to use."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(
            f"load_format must be one of {', '.join(LOAD_FORMATS)}, got {load_format!r}"
        )
    if model is None:
        from pagedllm.models.default import default_model_path

        model = str(default_model_path())
    if model.endswith(".gguf"):
        from pagedllm.loader.gguf import resolve_gguf

        if not os.path.isfile(model):
            raise ValueError(f"no GGUF file at {model}")
        return str(resolve_gguf(model)), "safetensors" if load_format == "auto" else load_format
    if not os.path.exists(model):
        packaged = CONFIGS_DIR / f"{model}.json"
        if not packaged.is_file():
            raise ValueError(
                f"model {model!r} is not a local folder or file, nor a packaged shape "
                f"({', '.join(packaged_shapes())}); no model is downloaded at run time"
            )
        model = str(packaged)
    if model.endswith(".json") and load_format != "dummy":
        raise ValueError(f"{model} is a bare config: it needs load_format='dummy' (random weights)")
    return model, load_format


def packaged_shapes() -> list[str]:
    """Model shapes shipped as HF config JSON (pagedllm/configs), for load_format='dummy'."""
    return sorted(p.stem for p in CONFIGS_DIR.glob("*.json"))


def _resolve_dtype(dtype: str, hf_config: Any, device: str) -> str:
    if dtype != "auto":
        if dtype not in SUPPORTED_DTYPES:
            raise ValueError(
                f"dtype must be auto or one of {', '.join(SUPPORTED_DTYPES)}, got {dtype!r}"
            )
        return dtype
    if device == "cpu":
        return "float32"
    config_dtype = str(getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", ""))
    return "float16" if "float16" in config_dtype and "bfloat" not in config_dtype else "bfloat16"


def _eos_token_ids(hf_config: Any, model_dir: str | None) -> tuple[int, ...]:
    """EOS ids from the config and, in a model folder, from generation_config.json."""
    ids: list[int] = []
    sources: list[Any] = [getattr(hf_config, "eos_token_id", None)]
    gen_path = Path(model_dir) / "generation_config.json" if model_dir else None
    if gen_path is not None and gen_path.is_file():
        sources.append(json.loads(gen_path.read_text()).get("eos_token_id"))
    for value in sources:
        for tok in value if isinstance(value, list) else [value]:
            if isinstance(tok, int) and tok not in ids:
                ids.append(tok)
    return tuple(ids)


def _build_model_config(
    args: EngineArgs, hf_config: Any, model_path: str, load_format: str, device: str
) -> ModelConfig:
    from pagedllm.models.registry import resolve_model

    architectures = list(getattr(hf_config, "architectures", None) or [])
    # NOTE: a clear error listing the supported architectures, before anything is loaded.
    architecture, _ = resolve_model(architectures, args.model_impl)
    derived_len = int(getattr(hf_config, "max_position_embeddings", 2048))
    max_model_len = args.max_model_len or derived_len
    if max_model_len > derived_len:
        raise ValueError(
            f"max_model_len={max_model_len} is larger than the model's "
            f"max_position_embeddings={derived_len}"
        )
    if max_model_len < 2:
        raise ValueError(f"max_model_len must be at least 2, got {max_model_len}")
    from pagedllm.models.default import DEFAULT_MODEL_GENERATION_CONFIG
    from pagedllm.transformers_utils.generation_config import sampling_defaults

    is_folder = os.path.isdir(model_path)
    defaults = sampling_defaults(
        args.generation_config,
        model_path if is_folder else None,
        DEFAULT_MODEL_GENERATION_CONFIG if args.model is None else None,
        args.override_generation_config,
    )
    if defaults.get("top_k", 0) > hf_config.vocab_size:
        defaults.pop("top_k")  # NOTE: above the vocabulary top_k filters nothing
    num_heads = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // num_heads
    tokenizer = args.tokenizer or (model_path if is_folder else None)
    return ModelConfig(
        model=model_path,
        tokenizer=None if args.skip_tokenizer_init else tokenizer,
        dtype=_resolve_dtype(args.dtype, hf_config, device),
        max_model_len=max_model_len,
        seed=args.seed,
        load_format=load_format,
        architecture=architecture,
        vocab_size=hf_config.vocab_size,
        hidden_size=hf_config.hidden_size,
        num_layers=hf_config.num_hidden_layers,
        num_attention_heads=num_heads,
        num_kv_heads=getattr(hf_config, "num_key_value_heads", None) or num_heads,
        head_dim=head_dim,
        hf_config=hf_config,
        eos_token_ids=_eos_token_ids(hf_config, model_path if is_folder else None),
        sampling_defaults=defaults,
        model_impl=args.model_impl,
        quantization=args.quantization,
    )
