"""FP8 checkpoints (`quant_method: "fp8"`), FP8 quantization at load (`quantization="fp8"`), and the
exact emulation of quantized activations (FP8 e4m3 and int8) that the W8A8 methods share.

Checkpoints (HF's FP8 config, the DeepSeek-V3 / Qwen3-FP8 layout): with `weight_block_size
[bn, bk]`, each linear holds `weight` float8_e4m3fn `[output, input]` and `weight_scale_inv`
float32 `[ceil(output / bn), ceil(input / bk)]` (despite its name, the multiplier of each block:
`W = q * scale_inv[o // bn, i // bk]`); activations are quantized dynamically per token and per
group of `bk` input features (1 x bk). Without `weight_block_size`: one `weight_scale` per fused part
(per tensor) and activations per token (`activation_scheme` "dynamic") or by the checkpoint's
static per-tensor `input_scale`. `modules_to_not_convert` / `ignored_layers` stay unquantized.

At load (`Fp8Config.for_unquantized_checkpoint`): the float weight is loaded as usual, then
quantized to e4m3 with one scale per tensor (`amax / 448`, or per output channel with
`weight_strategy="channel"`); activations per token.

The product on CUDA (`kernels.use_kernels`), FP8 only: the e4m3 weight stays as it is; each call
quantizes the activation with the Triton kernels of `kernels.fp8_quant` (per token, with the
static scale, or per 1 x bk group; fused with the MLP's SiLU-and-mul in `apply_silu_mul`), then
multiplies with `torch._scaled_mm` (per-tensor / per-channel weight scales, `kernels.fp8_gemm.
scaled_mm`; for a few rows the FP8 GEMV `kernels.gemv_quant.fp8_gemv`, with the GEMV switch) or
the Triton block-scaled GEMM (`block_scaled_mm`). What they do not take stays on
the torch path below: int8 W8A8, fused parts with different static input scales, K or N not a
multiple of 16 (cuBLASLt), a K block that is not a power of two.

The torch path (the CPU, and the kernels' oracle): the weight is dequantized once after loading
to float32 (exact: an e4m3 or int8 value times a float32 scale); each call quantizes the
activation as the method says (e4m3 with saturation, or int8 round-to-nearest-even, each with its
scale), dequantizes it and multiplies in float32, so the result is what an FP8/int8 GEMM with
float32 accumulation and scaled epilogue gives, up to the summation order (the kernels' only
difference: their sums, and the output rounded before the bias is added).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

from pagedllm.layers.quantization.base import LinearMethodBase, QuantizationConfig
from pagedllm.layers.quantization.packed import (
    DummyInit,
    PackedLayout,
    PackedLinearMethod,
    _output_parts,
    _part_index,
    add_packed_param,
    config_value,
    drop_params,
    dummy_scale,
    is_layer_skipped,
)

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8_DTYPE).max)  # 448
INT8_MAX = 127.0
# NOTE: the smallest dynamic scale (as vLLM's): an all-zero token gets zeros, not NaNs.
MIN_SCALE = 1.0 / (FP8_MAX * 512.0)

# --- activation quantization (exact emulation) --------------------------------------------


def quantize_fp8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`x / scale` saturated to ±448 and rounded to e4m3 (float32 in, float8 out)."""
    return (x / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """`round(x / scale)` (half to even) saturated to [-128, 127], as int8."""
    return torch.round(x / scale).clamp(-128, 127).to(torch.int8)


def fake_quant_per_token(x: torch.Tensor, kind: str) -> torch.Tensor:
    """`x [..., k]` float32 quantized per token (one scale `amax / qmax` per row) to `kind`
    ("fp8" or "int8"), then dequantized: what the GEMM multiplies."""
    qmax = FP8_MAX if kind == "fp8" else INT8_MAX
    scale = (x.abs().amax(-1, keepdim=True) / qmax).clamp(min=MIN_SCALE)
    q = quantize_fp8(x, scale) if kind == "fp8" else quantize_int8(x, scale)
    return q.float() * scale


def fake_quant_per_group(x: torch.Tensor, group: int) -> torch.Tensor:
    """`x [..., k]` float32 quantized to e4m3 per token and group of `group` features (the last
    group may be shorter), then dequantized."""
    k = x.shape[-1]
    pad = -k % group
    xp = F.pad(x, (0, pad)).unflatten(-1, (-1, group))
    scale = (xp.abs().amax(-1, keepdim=True) / FP8_MAX).clamp(min=MIN_SCALE)
    deq = quantize_fp8(xp, scale).float() * scale
    return deq.flatten(-2)[..., :k]


def fake_quant_static(x: torch.Tensor, scale: torch.Tensor, kind: str) -> torch.Tensor:
    """`x` float32 quantized with the static per-tensor `scale` to `kind`, then dequantized."""
    q = quantize_fp8(x, scale) if kind == "fp8" else quantize_int8(x, scale)
    return q.float() * scale


# --- parameters ---------------------------------------------------------------------------


def load_part_scalar(
    layer: Any, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None
) -> None:
    """A per-tensor scale (`[]` or `[1]` in the checkpoint) into its fused part's slot of `param
    [parts]`; without `shard_id`, every part's (an unfused or already-fused checkpoint tensor)."""
    if loaded.numel() != 1:
        raise ValueError(f"expected a per-tensor scale, got shape {tuple(loaded.shape)}")
    if shard_id is None:
        param.data.fill_(loaded.reshape(()).item())
        return
    param.data[_part_index(layer, shard_id)] = loaded.reshape(())


def dummy_input_scale(data: torch.Tensor, gen: torch.Generator, magnitude: float) -> None:
    """A static activation scale for dummy weights: 1/64 (normalized activations of a few units
    quantize without saturating e4m3)."""
    data.fill_(1.0 / 64)


def weight_scale_dummy(dtype: torch.dtype) -> DummyInit:
    """The dummy init of the scale of an e4m3 or int8 weight (`packed.dummy_scale`)."""
    return dummy_scale(FP8_MAX if dtype == FP8_DTYPE else INT8_MAX)


def add_part_scalar(layer: nn.Module, name: str, dummy_init: DummyInit) -> None:
    """Registers `name`: one float32 per-tensor scale per fused part (`load_part_scalar`),
    filled by `dummy_init` for dummy weights."""
    parts = len(_output_parts(layer))
    param = nn.Parameter(torch.zeros(parts, dtype=torch.float32), requires_grad=False)
    param.weight_loader = partial(load_part_scalar, layer)  # type: ignore[attr-defined]
    param.dummy_init = dummy_init  # type: ignore[attr-defined]
    layer.register_parameter(name, param)


def per_part_columns(layer: Any, values: torch.Tensor) -> torch.Tensor:
    """`values [parts]` repeated over each part's output rows: `[output_size_per_partition, 1]`."""
    sizes = torch.tensor(layer.output_partition_sizes, device=values.device)
    return values.repeat_interleave(sizes).unsqueeze(1)


# --- the linear method of quantized activations --------------------------------------------

# How activations are quantized: ("token", kind), ("group", size) or ("static", kind).
ActScheme = tuple[str, Any]


class ActQuantLinearMethod(PackedLinearMethod):
    """A W8A8 method: `dequantized(layer)` becomes a float32 `weight`; `apply` quantizes the
    activation per `act` (with `input_scale [parts]` for "static") and multiplies in float32."""

    def __init__(self, act: ActScheme) -> None:
        super().__init__()
        self.act = act

    def fp8_weight(self, layer: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The layer's e4m3 `[output, input]` weight and its float32 scale (one element, or one
        per output `[output]`) for `scaled_mm`; None: the method has none (int8)."""
        return None

    def _to_kernel_layout(self, layer: nn.Module) -> str | None:
        """Keeps the FP8 weight for the kernels (see the module doc): "scaled_mm", or None."""
        if self.act[0] == "group" or (self.act[0] != "static" and self.act[1] != "fp8"):
            return None
        if self.act[0] == "static":
            scales: torch.Tensor = layer.input_scale  # type: ignore[assignment]
            if self.act[1] != "fp8" or not bool((scales == scales[0]).all()):
                return None
            if bool((scales <= 0).any()):
                raise ValueError(f"{layer.prefix!r}: input_scale must be positive")
        from pagedllm.layers.quantization.kernels.fp8_gemm import scaled_mm_supported

        if not scaled_mm_supported(layer.output_size_per_partition, layer.input_size_per_partition):
            return None
        found = self.fp8_weight(layer)
        if found is None:
            return None
        weight, scale = found
        scale = scale.float().reshape(-1)
        if scale.numel() > 1 and bool((scale == scale[0]).all()):
            scale = scale[:1]  # NOTE: one scale for all: the tensor-wise cuBLASLt product
        input_scale = layer.input_scale[:1].clone() if self.act[0] == "static" else None
        drop_params(layer, (*self.PACKED_PARAMS, "input_scale"))
        layer.register_parameter("weight", nn.Parameter(weight.contiguous(), requires_grad=False))
        layer.register_buffer("weight_scale", scale.reshape(1, -1).contiguous())
        if input_scale is not None:
            layer.register_buffer("input_scale", input_scale.float())
        return "scaled_mm"

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        from pagedllm.layers.quantization import kernels

        layer.quant_kernel = None  # NOTE: read by `apply` from the layer's __dict__
        if kernels.use_kernels(layer.weight.device):
            layer.quant_kernel = self._to_kernel_layout(layer)
            if layer.quant_kernel is not None:
                return
        weight = self.dequantized(layer).float()
        # NOTE: a copy: `.float()` of a float32 parameter would be the parameter itself.
        scales = layer.input_scale.detach().float().clone() if self.act[0] == "static" else None
        for name in (*self.PACKED_PARAMS, "input_scale"):
            if name in layer._parameters:
                delattr(layer, name)
        layer.register_parameter("weight", nn.Parameter(weight, requires_grad=False))
        if scales is not None:
            if bool((scales <= 0).any()):
                raise ValueError(f"{layer.prefix!r}: input_scale must be positive")
            layer.register_buffer("input_scale", scales)

    def _quantized_input(self, x: torch.Tensor, scale: torch.Tensor | None = None) -> torch.Tensor:
        mode, arg = self.act
        if mode == "token":
            return fake_quant_per_token(x, arg)
        if mode == "group":
            return fake_quant_per_group(x, arg)
        assert scale is not None
        return fake_quant_static(x, scale, arg)

    def _apply_kernel(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool
    ) -> torch.Tensor:
        from pagedllm.layers.quantization.kernels import fp8_gemm, fp8_quant, gemv_quant

        n: int = layer.output_size_per_partition  # type: ignore[assignment]
        weight: torch.Tensor = layer.weight  # type: ignore[assignment]
        w_scale: torch.Tensor = layer.weight_scale  # type: ignore[assignment]
        if layer.__dict__["quant_kernel"] == "block":
            bk = self.act[1]
            q, scale = fp8_quant.quant_per_group(x, bk, silu_mul=silu_mul)
            y = fp8_gemm.block_scaled_mm(q, scale, weight, w_scale, self.block, x.dtype, bias)  # type: ignore[attr-defined]
        else:
            static = layer.input_scale if self.act[0] == "static" else None
            q, scale = fp8_quant.quant_per_token(x, static, silu_mul=silu_mul)  # type: ignore[arg-type]
            # NOTE: a few rows (decode): the FP8 GEMV streams the weight faster than cuBLASLt.
            if gemv_quant.fp8_wanted(q, weight, self.use_gemv):
                y = gemv_quant.fp8_gemv(q, scale, weight, w_scale, x.dtype, bias)
            else:
                y = fp8_gemm.scaled_mm(q, scale, weight, w_scale, x.dtype, bias)
        return y.view(*x.shape[:-1], n)

    def apply(
        self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if layer.__dict__.get("quant_kernel") is not None:
            return self._apply_kernel(layer, x, bias, silu_mul=False)
        weight: torch.Tensor = layer.weight  # type: ignore[assignment]
        x32 = x.float()
        if self.act[0] == "static":
            scales: torch.Tensor = layer.input_scale  # type: ignore[assignment]
            sizes: list[int] = layer.output_partition_sizes  # type: ignore[assignment]
            # NOTE: each fused part with its own input scale (exact; usually all equal).
            if bool((scales == scales[0]).all()):
                y = F.linear(self._quantized_input(x32, scales[0]), weight)
            else:
                ws = weight.split(sizes)
                y = torch.cat(
                    [
                        F.linear(self._quantized_input(x32, s), w)
                        for s, w in zip(scales, ws, strict=True)
                    ],
                    dim=-1,
                )
        else:
            y = F.linear(self._quantized_input(x32), weight)
        if bias is not None:
            y = y + bias.float()
        return y.to(x.dtype)

    def apply_silu_mul(
        self, layer: nn.Module, gate_up: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        # NOTE: never the unquantized GEMV: the activation must be quantized first (by the
        # kernel that also computes the SiLU-and-mul, on the kernel path).
        if layer.__dict__.get("quant_kernel") is not None:
            return self._apply_kernel(layer, gate_up, bias, silu_mul=True)
        return LinearMethodBase.apply_silu_mul(self, layer, gate_up, bias)


# --- the fp8 config -----------------------------------------------------------------------

ACTIVATION_SCHEMES = ("dynamic", "static")
WEIGHT_STRATEGIES = ("tensor", "channel")


class Fp8Config(QuantizationConfig):
    """`quant_method: "fp8"` checkpoints (block-wise or per tensor), or FP8 at load."""

    name: ClassVar[str] = "fp8"

    def __init__(
        self,
        is_checkpoint_fp8_serialized: bool = False,
        activation_scheme: str = "dynamic",
        weight_block_size: Sequence[int] | None = None,
        modules_to_not_convert: Sequence[str] = (),
        weight_strategy: str = "tensor",
    ) -> None:
        if activation_scheme not in ACTIVATION_SCHEMES:
            raise ValueError(
                f"fp8 activation_scheme {activation_scheme!r} is not supported "
                f"(only {ACTIVATION_SCHEMES})"
            )
        if weight_strategy not in WEIGHT_STRATEGIES:
            raise ValueError(f"fp8 weight_strategy must be one of {WEIGHT_STRATEGIES}")
        if weight_block_size is not None:
            if len(weight_block_size) != 2 or min(weight_block_size) <= 0:
                raise ValueError(f"fp8 weight_block_size must be [n, k], got {weight_block_size}")
            if not is_checkpoint_fp8_serialized:
                raise ValueError("fp8 block-wise quantization at load is not supported")
            if activation_scheme != "dynamic":
                raise ValueError("fp8 block-wise checkpoints need activation_scheme 'dynamic'")
        if activation_scheme == "static" and not is_checkpoint_fp8_serialized:
            raise ValueError("fp8 static activation scales need a checkpoint that holds them")
        self.is_checkpoint_fp8_serialized = is_checkpoint_fp8_serialized
        self.activation_scheme = activation_scheme
        self.weight_block_size = None if weight_block_size is None else list(weight_block_size)
        self.modules_to_not_convert = list(modules_to_not_convert)
        self.weight_strategy = weight_strategy

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Fp8Config:
        fmt = config_value(config, "fmt", default="e4m3")
        if fmt != "e4m3":
            raise ValueError(f"fp8 format {fmt!r} is not supported (only 'e4m3')")
        skip = config_value(config, "modules_to_not_convert", "ignored_layers", default=None)
        return cls(
            is_checkpoint_fp8_serialized=True,
            activation_scheme=str(config_value(config, "activation_scheme", default="dynamic")),
            weight_block_size=config_value(config, "weight_block_size", default=None),
            modules_to_not_convert=skip or (),
        )

    @classmethod
    def for_unquantized_checkpoint(cls, hf_config: Any) -> Fp8Config:
        return cls(is_checkpoint_fp8_serialized=False)

    def weight_bytes_per_param(self, dtype_size: int) -> float:
        if self.weight_block_size is None:
            return 1.0
        return 1.0 + 4.0 / (self.weight_block_size[0] * self.weight_block_size[1])

    def get_quant_method(self, layer: nn.Module, prefix: str) -> LinearMethodBase | None:
        if is_layer_skipped(prefix, self.modules_to_not_convert):
            return None
        if not self.is_checkpoint_fp8_serialized:
            return Fp8OnlineLinearMethod(self.weight_strategy)
        if self.weight_block_size is not None:
            return Fp8BlockLinearMethod(self.weight_block_size)
        act: ActScheme = (
            ("static", "fp8") if self.activation_scheme == "static" else ("token", "fp8")
        )
        return Fp8TensorLinearMethod(act)

    def __repr__(self) -> str:
        return (
            f"Fp8Config(serialized={self.is_checkpoint_fp8_serialized}, "
            f"activation_scheme={self.activation_scheme!r}, block={self.weight_block_size})"
        )


class Fp8BlockLinearMethod(ActQuantLinearMethod):
    """`weight` e4m3 and `weight_scale_inv` per `[bn, bk]` block; activations per 1 x bk group."""

    PACKED_PARAMS = ("weight", "weight_scale_inv")

    def __init__(self, block: Sequence[int]) -> None:
        super().__init__(("group", block[1]))
        self.block = (int(block[0]), int(block[1]))

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: Sequence[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        bn, bk = self.block
        out, k = sum(output_partition_sizes), input_size_per_partition
        if k != input_size and k % bk:
            raise ValueError(f"fp8: the input split {k} is not a multiple of the block {bk}")
        if len(output_partition_sizes) > 1 and any(n % bn for n in output_partition_sizes):
            raise ValueError(
                f"fp8: fused output parts {list(output_partition_sizes)} are not multiples of "
                f"the block {bn}"
            )
        add_packed_param(layer, "weight", (out, k), FP8_DTYPE, PackedLayout(1, 0))
        add_packed_param(
            layer,
            "weight_scale_inv",
            (-(-out // bn), -(-k // bk)),
            torch.float32,
            PackedLayout(1, 0, input_unit=bk, output_unit=bn),
            dummy_init=weight_scale_dummy(FP8_DTYPE),
        )

    def _to_kernel_layout(self, layer: nn.Module) -> str | None:
        """The e4m3 weight and its block scales (`weight_scale`) for `block_scaled_mm`."""
        bk = self.block[1]
        if bk < 16 or bk & (bk - 1):
            return None
        scale = layer.weight_scale_inv.float().contiguous()
        weight = layer.weight.contiguous()
        drop_params(layer, self.PACKED_PARAMS)
        layer.register_parameter("weight", nn.Parameter(weight, requires_grad=False))
        layer.register_buffer("weight_scale", scale)
        return "block"

    def dequantized(self, layer: Any) -> torch.Tensor:
        bn, bk = self.block
        out, k = layer.weight.shape
        scale = layer.weight_scale_inv.float()
        scale = scale.repeat_interleave(bn, 0)[:out].repeat_interleave(bk, 1)[:, :k]
        return layer.weight.float() * scale


class Fp8TensorLinearMethod(ActQuantLinearMethod):
    """`weight` e4m3 with one `weight_scale` per fused part; activations per token or static."""

    PACKED_PARAMS = ("weight", "weight_scale")

    def create_weights(
        self,
        layer: nn.Module,
        input_size_per_partition: int,
        output_partition_sizes: Sequence[int],
        input_size: int,
        output_size: int,
        params_dtype: torch.dtype,
        **extra_weight_attrs: Any,
    ) -> None:
        out, k = sum(output_partition_sizes), input_size_per_partition
        add_packed_param(layer, "weight", (out, k), FP8_DTYPE, PackedLayout(1, 0))
        add_part_scalar(layer, "weight_scale", weight_scale_dummy(FP8_DTYPE))
        if self.act[0] == "static":
            add_part_scalar(layer, "input_scale", dummy_input_scale)

    def fp8_weight(self, layer: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        return layer.weight, per_part_columns(layer, layer.weight_scale.float())

    def dequantized(self, layer: Any) -> torch.Tensor:
        return layer.weight.float() * per_part_columns(layer, layer.weight_scale.float())


def quantize_weight_fp8(
    weight: torch.Tensor, strategy: str = "tensor"
) -> tuple[torch.Tensor, torch.Tensor]:
    """e4m3 `q` and float32 `scale` (`[]` per tensor, `[output, 1]` per channel) of a float
    weight `[output, input]`, `scale = amax / 448`: `weight ≈ q * scale`."""
    w = weight.float()
    amax = w.abs().amax() if strategy == "tensor" else w.abs().amax(1, keepdim=True)
    scale = (amax / FP8_MAX).clamp(min=MIN_SCALE)
    return quantize_fp8(w, scale), scale


class Fp8OnlineLinearMethod(ActQuantLinearMethod):
    """A float `weight` loaded as unquantized, quantized to e4m3 after loading (per tensor or
    channel); activations per token."""

    PACKED_PARAMS = ("weight",)

    def __init__(self, strategy: str = "tensor") -> None:
        super().__init__(("token", "fp8"))
        # NOTE: `create_weights` is the unquantized one: the float weight and its loader.
        self.strategy = strategy

    def fp8_weight(self, layer: Any) -> tuple[torch.Tensor, torch.Tensor] | None:
        return quantize_weight_fp8(layer.weight, self.strategy)

    def dequantized(self, layer: Any) -> torch.Tensor:
        q, scale = quantize_weight_fp8(layer.weight, self.strategy)
        return q.float() * scale
