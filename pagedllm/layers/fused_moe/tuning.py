"""Launch configs of the fused-MoE kernels (`kernels.py`), as data: `MoEConfig` (a `BLOCK_M`
shared by both GEMMs, and per GEMM a `GemmConfig`: `BLOCK_N`, `BLOCK_K`, `GROUP_M`, warps,
stages), the JSON tables in `configs/` named by `config_file_name(E, I, H, dtype, device)`, one
entry per swept token count (`get_config` takes the nearest on a log scale), written by
`pagedllm bench moe --sweep`; without a table, `default_config`'s heuristic. No Triton here: the
tables are read and written without it.
"""

from __future__ import annotations

import functools
import json
import math
import re
from importlib import resources
from typing import Any, NamedTuple

import torch


class GemmConfig(NamedTuple):
    """One GEMM's tiles (`BLOCK_N` output columns, `BLOCK_K` of the reduction per step), the
    rows-of-blocks swizzle `GROUP_M` and the launch's warps and pipeline stages."""

    block_n: int
    block_k: int
    group_m: int = 1
    num_warps: int = 4
    num_stages: int = 3


class MoEConfig(NamedTuple):
    """`block_m` is shared: both GEMMs walk the same aligned slots."""

    block_m: int
    w13: GemmConfig
    w2: GemmConfig

    def to_json(self) -> dict[str, Any]:
        def gemm(g: GemmConfig) -> dict[str, int]:
            return {
                "BLOCK_N": g.block_n,
                "BLOCK_K": g.block_k,
                "GROUP_M": g.group_m,
                "num_warps": g.num_warps,
                "num_stages": g.num_stages,
            }

        return {"BLOCK_M": self.block_m, "w13": gemm(self.w13), "w2": gemm(self.w2)}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> MoEConfig:
        def gemm(g: dict[str, int]) -> GemmConfig:
            return GemmConfig(
                g["BLOCK_N"], g["BLOCK_K"], g["GROUP_M"], g["num_warps"], g["num_stages"]
            )

        return cls(d["BLOCK_M"], gemm(d["w13"]), gemm(d["w2"]))


def device_name(device: torch.device) -> str:
    """The name the tables are keyed by: CUDA's device name with non-alphanumerics as `_`
    ("NVIDIA_H200"); "cpu" for the interpreter."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^A-Za-z0-9]+", "_", torch.cuda.get_device_name(device)).strip("_")


def config_file_name(
    num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device: str
) -> str:
    """e.g. `E128-I768-H2048-bfloat16-NVIDIA_H200.json` (letters, digits, `-`, `_`, `.`)."""
    return f"E{num_experts}-I{inter}-H{hidden}-{str(dtype).removeprefix('torch.')}-{device}.json"


def configs_dir() -> Any:
    return resources.files("pagedllm.layers.fused_moe").joinpath("configs")


@functools.cache
def load_table(
    num_experts: int, inter: int, hidden: int, dtype: torch.dtype, device: str
) -> dict[int, MoEConfig] | None:
    """The swept table for this shape and device (token count → config), None when absent."""
    path = configs_dir().joinpath(config_file_name(num_experts, inter, hidden, dtype, device))
    if not path.is_file():
        return None
    raw = json.loads(path.read_text())
    return {int(m): MoEConfig.from_json(c) for m, c in raw.items() if not m.startswith("_")}


def get_config(
    num_tokens: int,
    num_experts: int,
    inter: int,
    hidden: int,
    dtype: torch.dtype,
    device: str,
    top_k: int = 8,
) -> MoEConfig:
    """The table's entry for the swept token count nearest `num_tokens` (on a log scale, ties
    to the smaller), else `default_config`."""
    table = load_table(num_experts, inter, hidden, dtype, device)
    if table:
        m = min(table, key=lambda t: (abs(math.log2(t) - math.log2(num_tokens)), t))
        return table[m]
    return default_config(num_tokens, num_experts, inter, hidden, dtype, top_k)


def default_config(
    num_tokens: int,
    num_experts: int,
    inter: int,
    hidden: int,
    dtype: torch.dtype,
    top_k: int = 8,
) -> MoEConfig:
    """By the slots per expert: 16-row blocks while experts see a few tokens (decode: the GEMMs
    stream weights, more column programs help), larger ones as they fill. fp32 halves BLOCK_K
    (its tiles are twice the bytes)."""
    per_expert = num_tokens * top_k / num_experts
    k_scale = 2 if dtype == torch.float32 else 1
    if per_expert <= 16:
        g13 = GemmConfig(64, 128 // k_scale, 1, 4, 3)
        return MoEConfig(16, g13, GemmConfig(64, 128 // k_scale, 1, 4, 3))
    if per_expert <= 64:
        g = GemmConfig(64, 64 // k_scale, 8, 4, 3)
        return MoEConfig(32 if per_expert <= 32 else 64, g, GemmConfig(128, 64 // k_scale, 8, 4, 3))
    return MoEConfig(
        128, GemmConfig(64, 64 // k_scale, 8, 8, 3), GemmConfig(128, 64 // k_scale, 8, 8, 3)
    )
