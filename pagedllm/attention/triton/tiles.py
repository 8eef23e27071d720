"""Host heuristics of the paged-attention kernels (kernels.py): the tile sizes of each launch
(`TileConfig`, `decode_config`, `varlen_config`), the head-dim tile (`padded_head_dim`) and the
KV split count of a decode launch (`choose_num_splits`). Plain Python over shapes: no kernel,
no device read."""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton


@dataclass(frozen=True)
class TileConfig:
    """One launch's tile sizes: `block_m` tile rows (query tokens x heads of one KV head),
    `block_n` KV positions per step."""

    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def padded_head_dim(head_dim: int) -> int:
    """The kernels' head-dim tile: `tl.arange` lengths are powers of two and `tl.dot` needs at
    least 16, so a head of 80 runs in tiles of 128 with the last 48 lanes masked."""
    return max(16, triton.next_power_of_2(head_dim))


# NOTE: at least 4 tiles per split and at most 64 splits; fewer programs than ~2 waves of the
# SMs trigger splitting.
_MIN_TILES_PER_SPLIT = 4
_MAX_SPLITS = 64


def decode_config(num_group: int, head_dim: int, dtype: torch.dtype) -> TileConfig:
    head_dim = padded_head_dim(head_dim)  # NOTE: the tile's width, which the registers hold
    block_m = max(16, triton.next_power_of_2(num_group))
    block_n = 64 if head_dim <= 128 and dtype != torch.float32 else 32
    return TileConfig(block_m=block_m, block_n=block_n, num_warps=4, num_stages=2)


def varlen_config(num_group: int, head_dim: int, dtype: torch.dtype) -> TileConfig:
    head_dim = padded_head_dim(head_dim)  # NOTE: the tile's width, which the registers hold
    if dtype == torch.float32:
        block_m, block_n = 64, 32
    elif head_dim <= 128:
        block_m, block_n = 64, 64
    else:
        block_m, block_n = 64, 32
    block_m = max(block_m, triton.next_power_of_2(num_group))
    num_warps = 8 if block_m * head_dim >= 128 * 128 else 4
    return TileConfig(block_m=block_m, block_n=block_n, num_warps=num_warps, num_stages=2)


@functools.cache
def num_sms(device: torch.device) -> int:
    """The device's SM count (8 off CUDA: the interpreter's tests)."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 8


def choose_num_splits(
    num_reqs: int, num_kv_heads: int, max_kv_len: int, block_n: int, num_sms: int
) -> int:
    """KV splits per (request, KV head) of a decode launch: enough programs for ~2 waves.

    NOTE: measured on an H200 (qwen3-0.6b layer, ~1.5k context): 24 and 32 requests (192 and
    256 programs) read 16 % and 5 % faster split in two; from 384 programs splitting loses."""
    programs = num_reqs * num_kv_heads
    if programs >= 2 * num_sms:
        return 1
    splits = min(
        triton.cdiv(2 * num_sms, programs),
        triton.cdiv(max_kv_len, block_n) // _MIN_TILES_PER_SPLIT,
        _MAX_SPLITS,
    )
    return max(1, splits)
