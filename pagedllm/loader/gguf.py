"""GGUF checkpoints → HF-style folders (config.json, safetensors, tokenizer), cached on disk.

Owns: reading GGUF metadata into an HF `config.json` dict (llama architecture), dequantizing GGUF
tensors to float32 (through `gguf_reader.py`: our own vectorized numpy kernels), renaming them to HF
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
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from pagedllm.loader.gguf_reader import dequantize, open_gguf

if TYPE_CHECKING:
    from gguf import GGUFReader, ReaderTensor
    from torch import nn

    from pagedllm.config import ModelConfig

# NOTE: bump when the converted output changes, so that cached folders are rebuilt.
CONVERTER_VERSION = 2
CACHE_DIR_ENV = "PAGEDLLM_CACHE_DIR"
_SHARD_BYTES = 4 << 30

# NOTE: the `gguf` package (~0.2 s to import) is imported inside the functions that read GGUF
# files, so a start-up that finds its conversion in the cache never imports it.

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
