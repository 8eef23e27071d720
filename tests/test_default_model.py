"""The default model, SmolLM2-135M-Instruct from its GGUF: exact against HF transformers, chat
through its template, and the `pagedllm generate` / `pagedllm chat` commands end to end."""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import time

import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.models.default import DefaultModelNotInstalledError, default_model_path

try:
    GGUF = default_model_path()
except DefaultModelNotInstalledError as e:  # pragma: no cover - CI installs it
    pytest.skip(f"default model not installed: {e}", allow_module_level=True)

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):",
    "Once upon a time, in a small village,",
    "1, 2, 3, 4,",
]


@pytest.fixture(scope="module")
def llm() -> LLM:
    return LLM(max_model_len=2048, kv_cache_memory="512MiB")


def test_greedy_matches_hf_on_the_same_gguf(llm: LLM) -> None:
    """HF reads the folder our converter wrote (its tensors equal transformers' own GGUF
    loading: tests/loader/test_gguf.py), in fp32; both must pick the same tokens."""
    from transformers import AutoModelForCausalLM

    folder = llm.llm_engine.config.model_config.model
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    tokenizer = llm.get_tokenizer()
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    for prompt, out in zip(PROMPTS, outputs):
        ids = torch.tensor([tokenizer.encode(prompt)])
        assert out.prompt_token_ids == ids[0].tolist()
        with torch.no_grad():
            ref = hf.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=24,
                min_new_tokens=24,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        assert out.outputs[0].token_ids == ref[0, ids.shape[1] :].tolist(), prompt


def test_chat_knows_the_capital_of_france(llm: LLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=32)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}], params)
    assert "Paris" in out[0].outputs[0].text
    # A batch of conversations, and the rendered prompt follows ChatML.
    conversations = [
        [{"role": "user", "content": "What is the capital of France?"}],
        [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "Hi"}],
    ]
    outs = llm.chat(conversations, params, use_tqdm=False)
    assert len(outs) == 2 and outs[1].prompt.startswith("<|im_start|>system\nAnswer in one word.")
    assert outs[0].outputs[0].token_ids == out[0].outputs[0].token_ids


def test_chat_rejects_bad_messages(llm: LLM) -> None:
    with pytest.raises(ValueError, match="messages"):
        llm.chat([])
    with pytest.raises(ValueError, match="messages"):
        llm.chat(["not a message"])  # type: ignore[list-item]


def test_chat_without_params_uses_the_default_models_generation_config(llm: LLM) -> None:
    """The model card's sampling (temperature 0.2, top_p 0.9) with room for a whole answer, so
    the README's `llm.chat(...)` prints a finished reply rather than 16 tokens at T = 1."""
    params = llm.get_default_sampling_params()
    assert (params.temperature, params.top_p, params.max_tokens) == (0.2, 0.9, 512)
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}])
    answer = out[0].outputs[0]
    assert answer.finish_reason == "stop" and "Paris" in answer.text


CLI = [sys.executable, "-m", "pagedllm.entrypoints.cli"]
ENGINE_FLAGS = ["--max-model-len", "1024", "--kv-cache-memory", "256MiB"]


def test_cli_generate_streams_the_completion() -> None:
    result = subprocess.run(
        [
            *CLI,
            "generate",
            "The capital of France is",
            "--max-tokens",
            "8",
            "--temperature",
            "0",
            *ENGINE_FLAGS,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_cli_generate_bad_flag_is_a_clear_error() -> None:
    result = subprocess.run(
        [*CLI, "generate", "hi", "--temperature", "-1", *ENGINE_FLAGS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "temperature" in result.stderr and "Traceback" not in result.stderr


def _read_until(fd: int, marker: bytes, timeout: float) -> bytes:
    buf = b""
    deadline = time.monotonic() + timeout
    while marker not in buf:
        left = deadline - time.monotonic()
        assert left > 0, f"timed out waiting for {marker!r}; got {buf[-500:]!r}"
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_cli_chat_in_a_terminal() -> None:
    """`pagedllm chat` on a pseudo-terminal: two turns (the second needs the first), then /exit."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [*CLI, "chat", "--temperature", "0", "--max-tokens", "32", *ENGINE_FLAGS],
        stdin=follower,
        stdout=follower,
        stderr=follower,
        close_fds=True,
    )
    os.close(follower)
    try:
        _read_until(leader, b"> ", timeout=300)
        os.write(leader, b"What is the capital of France?\n")
        first = _read_until(leader, b"\n> ", timeout=120)
        assert b"Paris" in first
        os.write(leader, b"What did I just ask you?\n")
        _read_until(leader, b"\n> ", timeout=120)
        os.write(leader, b"/exit\n")
        assert proc.wait(timeout=60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(leader)
