"""GGUF checkpoints → HF-style folders (config.json, safetensors, tokenizer), cached on disk.

Owns: reading GGUF metadata into an HF `config.json` dict (llama architecture), dequantizing GGUF
tensors to float32 (our own vectorized numpy kernels, per ggml's block layouts), renaming them to HF
names and undoing llama.cpp's q/k permutation, building the tokenizer and chat template through
transformers' GGUF support, and the conversion cache (`resolve_gguf`).

The converted folder is a plain HF checkpoint, so the rest of pagedllm (and HF transformers) loads
it like any other: GGUF is only an input format here, never a runtime weight format. Weights are
written as float32 by default: dequantized values (`d * q + m` with fp16 `d`, `m`) are exact in
fp32 but not in bf16/fp16, and fp32 keeps the converted tensors bit-equal to transformers' own GGUF
loading (the test oracle). The engine casts to its `--dtype` when it loads them. Pass
`dtype=torch.bfloat16` to `convert_gguf` to halve the disk size of large models.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

if TYPE_CHECKING:
    from gguf import GGMLQuantizationType, GGUFReader, ReaderTensor
    from torch import nn

    from pagedllm.config import ModelConfig

# NOTE: bump when the converted output changes, so that cached folders are rebuilt.
CONVERTER_VERSION = 2
CACHE_DIR_ENV = "PAGEDLLM_CACHE_DIR"
_SHARD_BYTES = 4 << 30

# NOTE: the `gguf` package (~0.2 s to import) is imported inside the functions that read GGUF
# files, so a start-up that finds its conversion in the cache never imports it.

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


# ---------------------------------------------------------------------------------------------
# Metadata → HF config.
# ---------------------------------------------------------------------------------------------

_ARCHITECTURES: dict[str, tuple[str, str]] = {"llama": ("LlamaForCausalLM", "llama")}


def _f32(value: float) -> float:
    """A float32 metadata value as its shortest decimal (9.999999747e-06 → 1e-05)."""
    return float(str(np.float32(value)))


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _architecture(reader: GGUFReader) -> str:
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(
            f"GGUF architecture {arch!r} is not supported by pagedllm's GGUF loader "
            f"(supported: {sorted(_ARCHITECTURES)}); convert the model to an HF folder instead"
        )
    return arch


def _rope_scaling(reader: GGUFReader, arch: str) -> dict[str, Any] | None:
    kind = _field(reader, f"{arch}.rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {
        "rope_type": kind,
        "factor": _f32(_field(reader, f"{arch}.rope.scaling.factor", 1.0)),
    }
    original = _field(reader, f"{arch}.rope.scaling.original_context_length")
    if original is not None:
        scaling["original_max_position_embeddings"] = int(original)
    return scaling


def _reader_config(reader: GGUFReader) -> dict[str, Any]:
    arch = _architecture(reader)
    hf_arch, model_type = _ARCHITECTURES[arch]
    names = {t.name for t in reader.tensors}
    if "rope_freqs.weight" in names:
        raise ValueError(
            "this GGUF stores Llama-3-style rope scaling as a rope_freqs tensor, which pagedllm "
            "cannot map back to an HF rope_scaling; use the model's HF folder instead"
        )
    heads = _field(reader, f"{arch}.attention.head_count")
    kv_heads = _field(reader, f"{arch}.attention.head_count_kv", heads)
    if isinstance(heads, list) or isinstance(kv_heads, list):
        raise ValueError("GGUF with per-layer head counts is not supported")
    hidden = int(_field(reader, f"{arch}.embedding_length"))
    n_tokens = len(_field(reader, "tokenizer.ggml.tokens", []))
    embed_rows = next((int(t.shape[1]) for t in reader.tensors if t.name == "token_embd.weight"), 0)
    cfg: dict[str, Any] = {
        "architectures": [hf_arch],
        "model_type": model_type,
        "hidden_size": hidden,
        "intermediate_size": int(_field(reader, f"{arch}.feed_forward_length")),
        "num_hidden_layers": int(_field(reader, f"{arch}.block_count")),
        "num_attention_heads": int(heads),
        "num_key_value_heads": int(kv_heads),
        "head_dim": int(_field(reader, f"{arch}.attention.key_length", hidden // int(heads))),
        "hidden_act": "silu",
        "rms_norm_eps": _f32(_field(reader, f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": _f32(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(reader, arch),
        "max_position_embeddings": int(_field(reader, f"{arch}.context_length", 2048)),
        "vocab_size": int(_field(reader, f"{arch}.vocab_size", n_tokens or embed_rows)),
        "tie_word_embeddings": "output.weight" not in names,
        "attention_bias": "blk.0.attn_q.bias" in names,
        "mlp_bias": False,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "torch_dtype": "float32",
    }
    return cfg


def gguf_to_hf_config(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The HF `config.json` dict of a GGUF file; ValueError for an unsupported architecture."""
    return _reader_config(open_gguf(path))


# ---------------------------------------------------------------------------------------------
# Tensors → HF names and layouts.
# ---------------------------------------------------------------------------------------------

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_LAYER_RE = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


def hf_tensor_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` → `model.layers.3.self_attn.q_proj.weight`; ValueError if unknown."""
    match = _LAYER_RE.fullmatch(gguf_name)
    if match and match.group(2) in _LAYER_NAMES:
        layer, part, kind = match.groups()
        return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{kind}"
    base, _, kind = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and kind in ("weight", "bias"):
        return f"{_GLOBAL_NAMES[base]}.{kind}"
    raise ValueError(f"unexpected tensor {gguf_name!r} in a llama GGUF")


def unpermute_qk(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Undoes convert_hf_to_gguf's `permute` of q/k rows (HF rotate-half → GGML interleaved rope).

    NOTE: llama.cpp permutes as reshape(n_heads, 2, d/2, ...).swapaxes(1, 2); rows of each head
    go from (pair, half) order back to (half, pair) order. Works for weights [out, in] and biases.
    """
    rows = weight.shape[0]
    head_dim = rows // n_heads
    return (
        weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])
        .transpose(1, 2)
        .reshape(weight.shape)
    )


def _tensor_to_torch(tensor: ReaderTensor) -> torch.Tensor:
    from gguf import GGMLQuantizationType

    flat = dequantize(tensor.data, GGMLQuantizationType(tensor.tensor_type), tensor.n_elements)
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    return torch.from_numpy(flat.reshape(shape))


def _iter_reader_weights(
    reader: GGUFReader, cfg: dict[str, Any]
) -> Iterator[tuple[str, torch.Tensor]]:
    n_heads = {"attn_q": cfg["num_attention_heads"], "attn_k": cfg["num_key_value_heads"]}
    for tensor in reader.tensors:
        name = hf_tensor_name(tensor.name)
        weight = _tensor_to_torch(tensor)
        part = tensor.name.split(".")[2] if tensor.name.startswith("blk.") else ""
        if part in n_heads:
            weight = unpermute_qk(weight, n_heads[part]).contiguous()
        yield name, weight


def iter_gguf_weights(path: str | os.PathLike[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, float32 tensor in HF layout) for every tensor of a llama GGUF, in file order."""
    reader = open_gguf(path)
    yield from _iter_reader_weights(reader, _reader_config(reader))


def gguf_source_path(model: str | os.PathLike[str]) -> Path:
    """The GGUF file behind `model`: a .gguf file itself, or a folder made by `convert_gguf`."""
    path = Path(model)
    if path.is_file() and path.suffix == ".gguf":
        return path
    config = path / "config.json"
    source = json.loads(config.read_text()).get("gguf_source", {}) if config.is_file() else {}
    if source.get("path") and Path(source["path"]).is_file():
        return Path(source["path"])
    raise ValueError(f"{model} is neither a .gguf file nor a folder converted from one")


def load_gguf_weights(model: nn.Module, model_config: ModelConfig) -> None:
    """Load format "gguf": fills `model` straight from the GGUF (no safetensors cache)."""
    from pagedllm.loader.model_loader import load_and_check_weights

    load_and_check_weights(model, iter_gguf_weights(gguf_source_path(model_config.model)))


# ---------------------------------------------------------------------------------------------
# Conversion to an HF folder, and the conversion cache.
# ---------------------------------------------------------------------------------------------

# NOTE: llama.cpp pre-tokenizers whose regex splits every digit first (`\p{N}`); transformers'
# GGUF converter drops that step, so it is restored as HF's `Digits(individual_digits=True)`.
_DIGIT_SPLIT_PRE = frozenset({"smollm"})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")


def _write_weights(
    weights: Iterator[tuple[str, torch.Tensor]], folder: Path, dtype: torch.dtype
) -> None:
    """Writes model.safetensors, or HF-style shards + index past `_SHARD_BYTES`."""
    from safetensors.torch import save_file

    parts: list[tuple[Path, list[str]]] = []
    shard: dict[str, torch.Tensor] = {}

    def flush() -> None:
        part = folder / f"part-{len(parts)}.safetensors"
        save_file(shard, str(part), metadata={"format": "pt"})
        parts.append((part, list(shard)))
        shard.clear()

    for name, weight in weights:
        weight = weight.to(dtype)
        if shard and sum(w.nbytes for w in shard.values()) + weight.nbytes > _SHARD_BYTES:
            flush()
        shard[name] = weight
    flush()
    if len(parts) == 1:
        parts[0][0].rename(folder / "model.safetensors")
        return
    weight_map: dict[str, str] = {}
    for i, (part, names) in enumerate(parts):
        final = f"model-{i + 1:05d}-of-{len(parts):05d}.safetensors"
        part.rename(folder / final)
        weight_map.update(dict.fromkeys(names, final))
    total = sum((folder / f).stat().st_size for f in set(weight_map.values()))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    _write_json(folder / "model.safetensors.index.json", index)


def _generation_config(reader: GGUFReader, cfg: dict[str, Any]) -> dict[str, Any]:
    eos = cfg["eos_token_id"]
    eot = _field(reader, "tokenizer.ggml.eot_token_id")
    if eot is not None and eos is not None and eot != eos:
        eos = [eos, eot]
    gen = {"bos_token_id": cfg["bos_token_id"], "eos_token_id": eos}
    gen["pad_token_id"] = cfg["pad_token_id"]
    return {k: v for k, v in gen.items() if v is not None}


def _write_tokenizer(path: Path, folder: Path, reader: GGUFReader, max_len: int) -> None:
    """Tokenizer files + chat template, built by transformers' GGUF support."""
    from tokenizers import pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # NOTE: the class AutoTokenizer picks for a GGUF, called directly: AutoTokenizer would first
    # build the model config from the GGUF (parsing the whole file again, ~10 s on 2 cores).
    # tests/loader/test_gguf.py checks that both write the same files.
    tok = PreTrainedTokenizerFast.from_pretrained(str(path.parent), gguf_file=path.name)
    backend = tok.backend_tokenizer
    if _field(reader, "tokenizer.ggml.pre") in _DIGIT_SPLIT_PRE and isinstance(
        backend.pre_tokenizer, pre_tokenizers.ByteLevel
    ):
        digits = pre_tokenizers.Digits(individual_digits=True)
        backend.pre_tokenizer = pre_tokenizers.Sequence([digits, backend.pre_tokenizer])
    tok.model_max_length = max_len
    tok.save_pretrained(str(folder))
    # NOTE: transformers 5 writes its class name "TokenizersBackend", unknown to transformers 4;
    # "PreTrainedTokenizerFast" names the same class in 5 and loads in both.
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    _write_json(config_path, config)


def _publish(tmp: Path, out_dir: Path, overwrite: bool) -> None:
    """Moves the finished `tmp` folder to `out_dir` in one rename."""
    trash = None
    if overwrite and out_dir.exists():
        trash = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
        out_dir.rename(trash)
    try:
        tmp.rename(out_dir)
    except OSError as exc:
        if out_dir.exists():
            raise FileExistsError(f"{out_dir} already exists") from exc
        raise
    if trash is not None:
        shutil.rmtree(trash, ignore_errors=True)


def convert_gguf(
    path: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    overwrite: bool = False,
) -> Path:
    """Converts a llama GGUF into an HF folder at `out_dir`, atomically (temp folder + rename).

    Writes config.json, generation_config.json, model.safetensors (`dtype`) and the tokenizer
    files (tokenizer.json, tokenizer_config.json, chat_template.jinja).
    """
    src, out = Path(path).resolve(), Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"{out} already exists (pass overwrite=True to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        reader = open_gguf(src)
        cfg = _reader_config(reader)
        cfg["torch_dtype"] = str(dtype).removeprefix("torch.")
        cfg["gguf_source"] = {
            "file": src.name,
            "path": str(src),
            "size": src.stat().st_size,
            "tensor_types": sorted({t.tensor_type.name for t in reader.tensors}),
            "converter_version": CONVERTER_VERSION,
        }
        _write_weights(_iter_reader_weights(reader, cfg), tmp, dtype)
        _write_json(tmp / "config.json", cfg)
        _write_json(tmp / "generation_config.json", _generation_config(reader, cfg))
        _write_tokenizer(src, tmp, reader, cfg["max_position_embeddings"])
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def default_cache_dir() -> Path:
    """`$PAGEDLLM_CACHE_DIR`, else `~/.cache/pagedllm`."""
    return Path(os.environ.get(CACHE_DIR_ENV) or "~/.cache/pagedllm").expanduser()


def gguf_cache_key(path: str | os.PathLike[str]) -> str:
    """`<stem>-<hash of name, size, mtime, converter version>`: a changed file gets a new key."""
    src = Path(path)
    st = src.stat()
    ident = f"{src.name}\0{st.st_size}\0{st.st_mtime_ns}\0{CONVERTER_VERSION}"
    return f"{src.stem}-{hashlib.sha256(ident.encode()).hexdigest()[:16]}"


def resolve_gguf(
    path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None
) -> Path:
    """The converted HF folder of a GGUF file under the cache; converts on the first call only."""
    src = Path(path).resolve()
    if not src.is_file():
        raise FileNotFoundError(f"GGUF file not found: {src}")
    out = Path(cache_dir or default_cache_dir()) / "gguf" / gguf_cache_key(src)
    if (out / "config.json").is_file():
        return out
    try:
        return convert_gguf(src, out)
    except FileExistsError:
        # NOTE: a concurrent process published the same conversion first; its folder is complete.
        if (out / "config.json").is_file():
            return out
        raise
