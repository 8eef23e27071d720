"""Reading GGUF files: a faster `GGUFReader`, and tensors dequantized to float32.

Split from `gguf.py` (the conversion to an HF folder), which is their user. The dequantization
kernels are our own vectorized numpy, per ggml's block layouts; tests compare each with the
`gguf` package's on random blocks.

NOTE: the `gguf` package is imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType, GGUFReader

# ---------------------------------------------------------------------------------------------
# Dequantization. Each kernel maps blocks [n, type_size] uint8 → values [n, block_size] float32.
# ---------------------------------------------------------------------------------------------


def _f16(blocks: np.ndarray, start: int) -> np.ndarray:
    """The fp16 scalar at byte `start` of each block, as float32 [n, 1]."""
    return np.ascontiguousarray(blocks[:, start : start + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """[n, k] bytes → [n, 2k]: the k low nibbles, then the k high nibbles (ggml's order)."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def _bits(packed: np.ndarray, count: int) -> np.ndarray:
    """[n, 4] little-endian uint32 bytes → [n, count] bits 0..count-1 as uint8."""
    word = np.ascontiguousarray(packed).view("<u4")
    return ((word >> np.arange(count, dtype=np.uint32)) & 1).astype(np.uint8)


def _dq_bf16(blocks: np.ndarray) -> np.ndarray:
    bits = np.ascontiguousarray(blocks).view("<u2").astype(np.uint32) << 16
    return bits.view(np.float32)


def _dq_q4_0(blocks: np.ndarray) -> np.ndarray:
    q = _nibbles(blocks[:, 2:18]).astype(np.int8) - np.int8(8)
    return _f16(blocks, 0) * q


def _dq_q4_1(blocks: np.ndarray) -> np.ndarray:
    q = _nibbles(blocks[:, 4:20])
    return _f16(blocks, 0) * q + _f16(blocks, 2)


def _dq_q5_0(blocks: np.ndarray) -> np.ndarray:
    q = _nibbles(blocks[:, 6:22]) | (_bits(blocks[:, 2:6], 32) << 4)
    return _f16(blocks, 0) * (q.astype(np.int8) - np.int8(16))


def _dq_q5_1(blocks: np.ndarray) -> np.ndarray:
    q = _nibbles(blocks[:, 8:24]) | (_bits(blocks[:, 4:8], 32) << 4)
    return _f16(blocks, 0) * q + _f16(blocks, 2)


def _dq_q8_0(blocks: np.ndarray) -> np.ndarray:
    return _f16(blocks, 0) * np.ascontiguousarray(blocks[:, 2:34]).view(np.int8)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """Q2_K/Q3_K 2-bit values: qs [n, 64] → [n, 2, 4, 32] (half h, shift j, l) = elem 128h+32j+l."""
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    return (qs.reshape(-1, 2, 1, 32) >> shifts) & 3


def _dq_q2_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    sc = blocks[:, 0:16].reshape(n, 2, 4, 2, 1)  # (h, j, l // 16)
    q = _crumbs(blocks[:, 16:80]).reshape(n, 2, 4, 2, 16)
    d, dmin = _f16(blocks, 80).reshape(n, 1, 1, 1, 1), _f16(blocks, 82).reshape(n, 1, 1, 1, 1)
    return ((d * (sc & 0x0F)) * q - dmin * (sc >> 4)).reshape(n, 256)


def _q3_k_scales(raw: np.ndarray) -> np.ndarray:
    """Q3_K's 12 scale bytes → [n, 16] signed 6-bit scales (low 4 bits, then 2 high bits)."""
    low = np.concatenate([raw[:, :8] & 0x0F, raw[:, :8] >> 4], axis=1)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)
    high = ((raw[:, 8:12].reshape(-1, 1, 4) >> shifts) & 3).reshape(-1, 16)
    return (low | (high << 4)).astype(np.int8) - np.int8(32)


def _dq_q3_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 2, 4, 1)  # hmask bit 4h + j
    high = (blocks[:, 0:32].reshape(n, 1, 1, 32) >> shifts) & 1
    q = _crumbs(blocks[:, 32:96]).astype(np.int8) - np.int8(4) * (1 - high).astype(np.int8)
    sc = _q3_k_scales(blocks[:, 96:108]).reshape(n, 2, 4, 2, 1)
    d = _f16(blocks, 108).reshape(n, 1, 1, 1, 1)
    return ((d * sc) * q.reshape(n, 2, 4, 2, 16)).reshape(n, 256)


def _k4_scale_min(raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K's 12 scale bytes → 8 six-bit scales and 8 six-bit mins, each [n, 8]."""
    sc = np.concatenate([raw[:, 0:4] & 63, (raw[:, 8:12] & 0x0F) | ((raw[:, 0:4] >> 6) << 4)], 1)
    mn = np.concatenate([raw[:, 4:8] & 63, (raw[:, 8:12] >> 4) | ((raw[:, 4:8] >> 6) << 4)], 1)
    return sc, mn


def _k_nibbles(qs: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K qs [n, 128] → [n, 8, 32]: sub-block 2j = low nibbles of chunk j, 2j+1 = high."""
    shifts = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1)
    return ((qs.reshape(-1, 4, 1, 32) >> shifts) & 0x0F).reshape(-1, 8, 32)


def _k_affine(blocks: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Q4_K/Q5_K: value = d * scale * q - dmin * min, per 32-element sub-block."""
    sc, mn = _k4_scale_min(blocks[:, 4:16])
    d, dmin = _f16(blocks, 0), _f16(blocks, 2)
    return ((d * sc)[:, :, None] * q - (dmin * mn)[:, :, None]).reshape(-1, 256)


def _dq_q4_k(blocks: np.ndarray) -> np.ndarray:
    return _k_affine(blocks, _k_nibbles(blocks[:, 16:144]))


def _dq_q5_k(blocks: np.ndarray) -> np.ndarray:
    shifts = np.arange(8, dtype=np.uint8).reshape(1, 8, 1)
    high = (blocks[:, 16:48].reshape(-1, 1, 32) >> shifts) & 1
    return _k_affine(blocks, _k_nibbles(blocks[:, 48:176]) | (high << 4))


def _dq_q6_k(blocks: np.ndarray) -> np.ndarray:
    n = blocks.shape[0]
    nib_shift = np.array([0, 4], dtype=np.uint8).reshape(1, 1, 2, 1, 1)
    low = ((blocks[:, 0:128].reshape(n, 2, 1, 2, 32) >> nib_shift) & 0x0F).reshape(n, 2, 4, 32)
    high_shift = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    high = (blocks[:, 128:192].reshape(n, 2, 1, 32) >> high_shift) & 3
    q = (low | (high << 4)).astype(np.int8) - np.int8(32)
    sc = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).reshape(n, 2, 4, 2, 1)
    d = _f16(blocks, 208).reshape(n, 1, 1, 1, 1)
    return ((d * sc) * q.reshape(n, 2, 4, 2, 16)).reshape(n, 256)


# Keyed by GGMLQuantizationType names.
_PLAIN_DTYPES: dict[str, np.dtype] = {
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "F64": np.dtype("<f8"),
    "I8": np.dtype("i1"),
    "I16": np.dtype("<i2"),
    "I32": np.dtype("<i4"),
}

_BLOCK_KERNELS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "BF16": _dq_bf16,
    "Q4_0": _dq_q4_0,
    "Q4_1": _dq_q4_1,
    "Q5_0": _dq_q5_0,
    "Q5_1": _dq_q5_1,
    "Q8_0": _dq_q8_0,
    "Q2_K": _dq_q2_k,
    "Q3_K": _dq_q3_k,
    "Q4_K": _dq_q4_k,
    "Q5_K": _dq_q5_k,
    "Q6_K": _dq_q6_k,
}

SUPPORTED_TYPE_NAMES: frozenset[str] = frozenset(_PLAIN_DTYPES) | frozenset(_BLOCK_KERNELS)


def dequantize(raw: np.ndarray, qtype: GGMLQuantizationType, n_elements: int) -> np.ndarray:
    """The raw bytes of one tensor (any shape, viewed as uint8) → flat float32 [n_elements]."""
    from gguf import GGML_QUANT_SIZES

    data = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    if qtype.name in _PLAIN_DTYPES:
        return data.view(_PLAIN_DTYPES[qtype.name])[:n_elements].astype(np.float32)
    if qtype.name not in _BLOCK_KERNELS:
        raise ValueError(f"GGUF tensor type {qtype.name} is not supported by pagedllm's loader")
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    if n_elements % block_size:
        raise ValueError(f"{n_elements} elements is not a multiple of {qtype.name} blocks")
    n_blocks = n_elements // block_size
    blocks = data[: n_blocks * type_size].reshape(n_blocks, type_size)
    return _BLOCK_KERNELS[qtype.name](blocks).astype(np.float32, copy=False).reshape(-1)


def open_gguf(path: str | os.PathLike[str]) -> GGUFReader:
    """`gguf.GGUFReader` of `path`, parsed ~3x faster (see `_fast_reader_class`)."""
    return _fast_reader_class()(path)


_FAST_READER: Any = None


def _fast_reader_class() -> Any:
    """A GGUFReader whose field reads slice a plain ndarray view of the file's memmap.

    NOTE: GGUFReader parses each vocabulary string and merge as its own tiny memmap slice, and
    numpy's memmap subclass makes every slice ~4x costlier than a plain one (about 6 s for
    SmolLM2's 49k tokens + 49k merges on 2 cores). `_get` is GGUFReader's own (same arrays, same
    byte order), reading from the same mapped bytes; tests compare it with GGUFReader.
    """
    global _FAST_READER
    if _FAST_READER is None:
        from gguf import GGUFReader

        class FastGGUFReader(GGUFReader):
            def _get(
                self,
                offset: int,
                dtype: Any,
                count: int = 1,
                override_order: Any = None,
            ) -> np.ndarray:
                plain = self.__dict__.get("_plain")
                if plain is None:
                    plain = self._plain = self.data.view(np.ndarray)
                count = int(count)
                dt = np.dtype(dtype)
                arr = plain[offset : offset + dt.itemsize * count].view(dt)[:count]
                order = self.byte_order if override_order is None else override_order
                return arr.view(arr.dtype.newbyteorder(order))

        _FAST_READER = FastGGUFReader
    return _FAST_READER
