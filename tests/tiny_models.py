"""Tiny random-weight HF models written to a folder at test time (no downloads).

Each folder holds config.json, model.safetensors, generation_config.json and a small byte-level
BPE tokenizer trained here, so the engine loads it exactly as it would load a real model.
"""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB_SIZE = 512

_BASE = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=1024,
    rms_norm_eps=1e-6,
    # NOTE: a wide init makes the logits spread out, so greedy argmax is far from ties and
    # exact comparisons with HF do not hinge on float rounding.
    initializer_range=0.25,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
)

ARCHS: dict[str, dict] = {
    "llama": dict(
        model_type="llama",
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 256,
        },
    ),
    "mistral": dict(model_type="mistral", tie_word_embeddings=False, sliding_window=128),
    "qwen2": dict(model_type="qwen2", tie_word_embeddings=True, rope_theta=1000000.0),
    "qwen3": dict(model_type="qwen3", tie_word_embeddings=True, head_dim=32, rope_theta=1000000.0),
}


def make_tokenizer(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    corpus = [
        "The quick brown fox jumps over the lazy dog.",
        "Paged attention stores keys and values in blocks.",
        "Hello world! Numbers 0123456789 and symbols ,.;:?!",
        "Continuous batching keeps the accelerator busy.",
    ] * 50
    tok.train_from_iterator(corpus, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )
    fast.save_pretrained(path)


def make_model(arch: str, path: Path, seed: int = 0) -> Path:
    """Writes a tiny random `arch` model with its tokenizer to `path` and returns it."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(_BASE)
    cfg.update(ARCHS[arch])
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(path)
    make_tokenizer(path)
    return path


def load_hf(path: Path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager"
    )
    model.generation_config.eos_token_id = None  # the engine's tests use ignore_eos
    model.generation_config.pad_token_id = 0
    return model.eval()


def hf_greedy(model, prompts: list[list[int]], max_tokens: list[int]) -> list[list[int]]:
    """Greedy continuations from HF `generate`, one prompt at a time (no padding effects)."""
    outs = []
    with torch.no_grad():
        for prompt, n in zip(prompts, max_tokens):
            ids = torch.tensor([prompt])
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=n,
                min_new_tokens=n,
                do_sample=False,
            )
            outs.append(gen[0, len(prompt) :].tolist())
    return outs
