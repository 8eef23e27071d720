"""Worker: owns one device. Loads the model, sizes and allocates the paged KV cache from its
attention layers' `KVCacheSpec`s (each layer's tensor shaped by its backend), warms the model
up, runs steps."""

from __future__ import annotations

import logging
import math

import numpy as np
import torch

from pagedllm.attention.backend import get_attention_backend
from pagedllm.attention.fp8_kv import kv_cache_torch_dtype
from pagedllm.attention.layer import Attention
from pagedllm.config import EngineConfig
from pagedllm.engine.kv_cache_spec import KVCacheSpec, block_bytes, uniform_sliding_window
from pagedllm.engine.outputs import GrammarOutput, ModelRunnerOutput, SchedulerOutput
from pagedllm.utils import cdiv
from pagedllm.worker.draft_model import make_drafter
from pagedllm.worker.model_runner import InFlightStep, ModelRunner

logger = logging.getLogger(__name__)

DEFAULT_CPU_KV_CACHE_MEMORY = 4 * 1024**3

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class Worker:
    def __init__(self, config: EngineConfig) -> None:
        from pagedllm.loader import load_model

        self.config = config
        self.device = torch.device(config.device_config.device)
        mc = config.model_config
        torch.manual_seed(mc.seed)
        self.attn_backend = get_attention_backend(config.attention_backend, self.device.type)
        # NOTE: before the load, so a cache dtype this torch or GPU cannot hold fails fast.
        self.kv_cache_dtype = config.cache_config.kv_cache_dtype(mc.dtype)
        kv_cache_torch_dtype(self.kv_cache_dtype, self.device)
        self.model = load_model(
            mc,
            str(self.device),
            self.attn_backend,
            config.kernel_config,
            config.parallel_config,
        )
        # Speculative decoding's draft model: its layers' caches share the target's blocks.
        self.drafter = make_drafter(config, self.device, self.attn_backend, self.model)
        self.model_runner = ModelRunner(
            config, self.model, self.device, self.attn_backend, self.drafter
        )
        self.attention_layers = {
            name: module for name, module in self.model.named_modules()
            if isinstance(module, Attention)
        }  # fmt: skip
        if self.drafter is not None:
            self.attention_layers.update(self.drafter.attention_layers)
        self.num_blocks = 0

    @property
    def kv_cache_specs(self) -> dict[str, KVCacheSpec]:
        """What each attention layer keeps per block, by module name."""
        cc = self.config.cache_config
        return {
            name: layer.kv_cache_spec(cc.block_size, self.kv_cache_dtype)
            for name, layer in self.attention_layers.items()
        }

    @property
    def block_bytes(self) -> int:
        """What one block id costs, over every layer."""
        return block_bytes(self.kv_cache_specs)

    def determine_num_blocks(self) -> int:
        """KV blocks that fit the memory budget; fails if one max_model_len request cannot fit."""
        cc = self.config.cache_config
        if cc.num_gpu_blocks_override is not None:
            num_blocks = cc.num_gpu_blocks_override
        elif cc.kv_cache_memory is not None or self.device.type == "cpu":
            budget = cc.kv_cache_memory or DEFAULT_CPU_KV_CACHE_MEMORY
            num_blocks = budget // self.block_bytes
        else:
            num_blocks = self._profile_gpu_blocks()
        max_model_len = self.config.model_config.max_model_len
        needed = cdiv(max_model_len, cc.block_size)
        window = uniform_sliding_window(self.kv_cache_specs)
        if window is not None:
            # Its blocks out of the window are freed: a step holds the window and its chunk.
            chunk = self.config.scheduler_config.max_num_batched_tokens
            needed = min(needed, cdiv(window - 1 + chunk, cc.block_size) + 1)
        if num_blocks < needed:
            raise ValueError(
                f"the KV cache holds {num_blocks} blocks ({num_blocks * cc.block_size} tokens), "
                f"but one request of max_model_len={max_model_len} needs {needed} blocks: "
                f"give at least kv_cache_memory={needed * self.block_bytes} bytes "
                f"({needed * self.block_bytes / 2**30:.2f} GiB), or lower max_model_len"
            )
        return num_blocks

    @torch.inference_mode()
    def _profile_gpu_blocks(self) -> int:
        """(gpu_memory_utilization × total − weights − activation peak) / bytes per block."""
        from pagedllm.forward_context import set_forward_context

        sc = self.config.scheduler_config
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        n = sc.max_num_batched_tokens
        ids = torch.zeros(n, dtype=torch.long, device=self.device)
        with set_forward_context(None):
            positions = torch.arange(n, device=self.device)
            hidden = self.model_runner.pipeline.forward_alone(self.model, ids, positions)
        if hidden is not None:  # the last pipeline stage (or the only one) computes logits
            self.model.compute_logits(hidden[: sc.max_num_seqs]).float().softmax(-1)
        torch.cuda.synchronize(self.device)
        peak = torch.cuda.max_memory_allocated(self.device)
        del hidden
        free, total = torch.cuda.mem_get_info(self.device)
        # Memory held outside torch's allocator (other processes, CUDA context) also counts.
        non_torch = total - free - torch.cuda.memory_reserved(self.device)
        budget = self.config.cache_config.gpu_memory_utilization * total - peak - non_torch
        num_blocks = max(int(budget // self.block_bytes), 0)
        logger.info(
            "memory profile: total %.2f GiB, peak %.2f GiB, KV budget %.2f GiB",
            total / 2**30,
            peak / 2**30,
            budget / 2**30,
        )
        return num_blocks

    def initialize_cache(self, num_blocks: int) -> None:
        """Allocates each attention layer's cache tensor (its backend's shape for its spec)."""
        cc = self.config.cache_config
        for name, spec in self.kv_cache_specs.items():
            layer = self.attention_layers[name]
            shape = layer.backend.kv_cache_shape(num_blocks, spec)
            # NOTE: zeroed, so padding slots a kernel may touch never hold NaNs.
            dtype = kv_cache_torch_dtype(spec.dtype, self.device)
            layer.kv_cache = _zeros(shape, dtype, self.device)
        self.num_blocks = num_blocks
        logger.info(
            "KV cache: %d blocks of %d tokens (%d tokens, %.2f GiB)",
            num_blocks,
            cc.block_size,
            num_blocks * cc.block_size,
            num_blocks * self.block_bytes / 2**30,
        )

    def warm_up(self) -> None:
        """Compiles the kernels and captures the CUDA graphs (after the cache is bound)."""
        self.model_runner.warm_up()
        self.model_runner.capture_cuda_graphs()

    def launch_model(self, scheduler_output: SchedulerOutput) -> InFlightStep | None:
        return self.model_runner.launch(scheduler_output)

    def sample_tokens(self, step: InFlightStep | None, grammar: GrammarOutput) -> None:
        self.model_runner.sample_tokens(step, grammar)

    def collect_output(self, step: InFlightStep | None) -> ModelRunnerOutput:
        return self.model_runner.collect(step)

    def abandon_steps(self) -> None:
        self.model_runner.abandon_steps()


def _zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A zeroed tensor. On the CPU it comes from calloc'd memory (numpy), whose pages the OS
    zero-fills on first touch: a multi-GiB KV cache costs nothing until it is used."""
    if device.type != "cpu":
        return torch.zeros(shape, dtype=dtype, device=device)
    nbytes = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)
