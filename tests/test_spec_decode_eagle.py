"""EAGLE and EAGLE-3 speculative decoding (methods "eagle", "eagle3"), fp32 CPU.

Random heads in the published layouts (safetensors + config.json as yuhuili/EAGLE-LLaMA3-
Instruct-8B and yuhuili/EAGLE3-LLaMA3.1-Instruct-8B have them) for a tiny random 8-layer Llama
target (EAGLE-3's default target layers (2, n // 2, n - 3) need 8):
- the proposals equal an independent torch reference: HF's target (its hidden states) and the
  head's math written here over the whole sequence, with no cache;
- greedy output identical with and without speculation (a random head: low acceptance), with
  chunked prefill, prefix-cache hits and preemption; no KV block leaked under random
  add / step / abort;
- a head of another hidden size or vocabulary, or one whose target layers the target lacks,
  is refused with a ValueError naming speculative_config.model.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from pagedllm import LLM, SamplingParams
from tests.tiny_models import _BASE, ARCHS, make_tokenizer

COMMON = dict(dtype="float32", max_model_len=256, seed=0)
H, HEADS, KV_HEADS, HEAD_DIM, FFN, VOCAB = 64, 4, 2, 16, 128, _BASE["vocab_size"]
DRAFT_VOCAB = 200
NUM_TARGET_LAYERS = 8
AUX_LAYERS = (2, 4, 5)  # (2, n // 2, n - 3)


def _make_target(path: Path) -> str:
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**_BASE, **ARCHS["llama"], "num_hidden_layers": NUM_TARGET_LAYERS}
    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    model.save_pretrained(path)
    make_tokenizer(path)
    return str(path)


def _layer_tensors(prefix: str, qkv_in: int, gen: torch.Generator) -> dict[str, torch.Tensor]:
    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen) * 0.25

    def norm() -> torch.Tensor:
        return 1 + 0.1 * torch.randn(H, generator=gen)

    return {
        f"{prefix}.self_attn.q_proj.weight": rnd(HEADS * HEAD_DIM, qkv_in),
        f"{prefix}.self_attn.k_proj.weight": rnd(KV_HEADS * HEAD_DIM, qkv_in),
        f"{prefix}.self_attn.v_proj.weight": rnd(KV_HEADS * HEAD_DIM, qkv_in),
        f"{prefix}.self_attn.o_proj.weight": rnd(H, HEADS * HEAD_DIM),
        f"{prefix}.mlp.gate_proj.weight": rnd(FFN, H),
        f"{prefix}.mlp.up_proj.weight": rnd(FFN, H),
        f"{prefix}.mlp.down_proj.weight": rnd(H, FFN),
        f"{prefix}.post_attention_layernorm.weight": norm(),
        **({f"{prefix}.input_layernorm.weight": norm()} if prefix == "midlayer" else {}),
        **({f"{prefix}.hidden_norm.weight": norm()} if prefix == "midlayer" else {}),
    }


def make_head(path: Path, method: str, seed: int = 0, **config_overrides) -> str:
    """A random EAGLE ("eagle") or EAGLE-3 ("eagle3") head checkpoint in the published layout."""
    gen = torch.Generator().manual_seed(seed)
    path.mkdir(parents=True, exist_ok=True)
    cfg = {**_BASE, **ARCHS["llama"], "num_hidden_layers": 1, "torch_dtype": "float32"}
    if method == "eagle":
        cfg["architectures"] = ["LlamaForCausalLM"]  # as EAGLE-LLaMA3-Instruct-8B says
        tensors = _layer_tensors("layers.0", H, gen)
        tensors["fc.weight"] = torch.randn(H, 2 * H, generator=gen) * 0.1
        tensors["embed_tokens.weight"] = torch.randn(VOCAB, H, generator=gen)  # ignored
    else:
        cfg.update(architectures=["LlamaForCausalLMEagle3"], draft_vocab_size=DRAFT_VOCAB)
        tensors = _layer_tensors("midlayer", 2 * H, gen)
        tensors["fc.weight"] = torch.randn(H, 3 * H, generator=gen) * 0.1
        tensors["norm.weight"] = 1 + 0.1 * torch.randn(H, generator=gen)
        tensors["lm_head.weight"] = torch.randn(DRAFT_VOCAB, H, generator=gen) * 0.25
        ids = torch.randperm(VOCAB, generator=gen)[:DRAFT_VOCAB].sort().values
        tensors["d2t"] = ids - torch.arange(DRAFT_VOCAB)
        t2d = torch.zeros(VOCAB, dtype=torch.bool)
        t2d[ids] = True
        tensors["t2d"] = t2d
    cfg.update(config_overrides)
    (path / "config.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return str(path)


@pytest.fixture(scope="module")
def dirs(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("eagle")
    return {
        "target": _make_target(root / "target"),
        "eagle": make_head(root / "eagle", "eagle", seed=2),
        "eagle3": make_head(root / "eagle3", "eagle3", seed=3),
    }


def _spec(method: str, model: str, k: int) -> dict:
    return {"method": method, "model": model, "num_speculative_tokens": k}


def _prompts(seed: int) -> list[list[int]]:
    rnd = random.Random(seed)
    return [[rnd.randrange(3, 500) for _ in range(rnd.randrange(3, 60))] for _ in range(6)]


MAX_TOKENS = [30, 3, 20, 30, 1, 25]


def _generate(llm: LLM, prompts: list[list[int]], **params) -> list[list[int]]:
    sp = [SamplingParams(max_tokens=m, ignore_eos=True, **params) for m in MAX_TOKENS]
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], sp, use_tqdm=False)
    return [o.outputs[0].token_ids for o in outs]


@pytest.fixture(scope="module")
def greedy_reference(dirs) -> list[list[int]]:
    return _generate(LLM(dirs["target"], kv_cache_memory="64MiB", **COMMON), _prompts(0),
                     temperature=0)  # fmt: skip


# ----- config -----


def test_bad_heads_refused(dirs, tiny_model_dirs, tmp_path) -> None:
    from pagedllm.config import SpeculativeConfig

    with pytest.raises(ValueError, match="needs model"):
        SpeculativeConfig.from_dict({"method": "eagle"})
    target = dirs["target"]
    for method, overrides, message in (
        ("eagle", {"hidden_size": 32}, "hidden size is \\[32\\]"),
        ("eagle3", {"target_hidden_size": 128}, "hidden size is \\[64, 128\\]"),
        ("eagle", {"vocab_size": 256}, "vocabulary has 256"),
        ("eagle3", {"draft_vocab_size": 1000, "vocab_size": VOCAB}, "draft_vocab_size=1000"),
        ("eagle3", {"architectures": ["LlamaForCausalLM"]}, "EAGLE-3 head's architectures"),
    ):
        folder = tmp_path / f"{method}-{len(list(tmp_path.iterdir()))}"
        head = make_head(folder, method, **overrides)
        with pytest.raises(ValueError, match=f"speculative_config.model='{head}': .*{message}"):
            LLM(target, speculative_config=_spec(method, head, 2), **COMMON)
    # a 2-layer target has no layers (2, 1, -1) for EAGLE-3
    with pytest.raises(ValueError, match=r"speculative_config.model=.*3 distinct target layers"):
        LLM(tiny_model_dirs["llama"], speculative_config=_spec("eagle3", dirs["eagle3"], 2),
            **COMMON)  # fmt: skip


# ----- the proposals against a torch reference -----


def _rms(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + _BASE["rms_norm_eps"]) * w


def _ref_layer(w: dict, p: str, attn_in: torch.Tensor, residual: torch.Tensor, cos, sin):
    """A Llama decoder layer over a whole sequence (causal), from attention input and residual
    stream; returns the residual stream after it."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    t = attn_in.shape[0]
    q = (attn_in @ w[f"{p}.self_attn.q_proj.weight"].T).view(t, HEADS, HEAD_DIM).transpose(0, 1)
    k = (attn_in @ w[f"{p}.self_attn.k_proj.weight"].T).view(t, KV_HEADS, HEAD_DIM).transpose(0, 1)
    v = (attn_in @ w[f"{p}.self_attn.v_proj.weight"].T).view(t, KV_HEADS, HEAD_DIM).transpose(0, 1)
    q, k = apply_rotary_pos_emb(q[None], k[None], cos, sin)
    k, v = k[0].repeat_interleave(HEADS // KV_HEADS, 0), v.repeat_interleave(HEADS // KV_HEADS, 0)
    scores = q[0] @ k.transpose(1, 2) / HEAD_DIM**0.5
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    attn = (scores.softmax(-1) @ v).transpose(0, 1).reshape(t, HEADS * HEAD_DIM)
    x = attn @ w[f"{p}.self_attn.o_proj.weight"].T + residual
    h = _rms(x, w[f"{p}.post_attention_layernorm.weight"])
    act = torch.nn.functional.silu(h @ w[f"{p}.mlp.gate_proj.weight"].T)
    return x + (act * (h @ w[f"{p}.mlp.up_proj.weight"].T)) @ w[f"{p}.mlp.down_proj.weight"].T


def _ref_drafts(method: str, target, w: dict, tokens: list[int], k: int) -> list[int]:
    """The head's k greedy drafts after `tokens`, recomputed over the whole sequence: row p
    reads token p + 1 and the target's hidden state at p (then the head's own)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    with torch.no_grad():
        out = target(torch.tensor([tokens]), output_hidden_states=True)
        hs = [h[0] for h in out.hidden_states]
        embed = target.model.embed_tokens.weight
        if method == "eagle":
            state = hs[-1][:-1]  # the final normed output
        else:
            state = torch.cat([hs[i][:-1] for i in AUX_LAYERS], -1) @ w["fc.weight"].T
        seq, drafts = list(tokens[1:]), []
        rope = LlamaRotaryEmbedding(target.config)
        for _ in range(k):
            t = len(seq)
            cos, sin = rope(state[None], torch.arange(t)[None])
            e = embed[torch.tensor(seq)]
            if method == "eagle":
                x = torch.cat([e, state], -1) @ w["fc.weight"].T
                y = _ref_layer(w, "layers.0", x, x, cos, sin)  # no input norm
                logits, nxt = y[-1] @ target.lm_head.weight.T, y[-1]
            else:
                m = "midlayer"
                attn_in = torch.cat([_rms(e, w[f"{m}.input_layernorm.weight"]),
                                     _rms(state, w[f"{m}.hidden_norm.weight"])], -1)  # fmt: skip
                y = _ref_layer(w, m, attn_in, state, cos, sin)
                full = torch.full((VOCAB,), float("-inf"))
                ids = torch.arange(DRAFT_VOCAB) + w["d2t"]
                full[ids] = _rms(y[-1], w["norm.weight"]) @ w["lm_head.weight"].T
                logits, nxt = full, y[-1]
            drafts.append(int(logits.argmax()))
            seq.append(drafts[-1])
            state = torch.cat([state, nxt[None]], 0)
    return drafts


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_proposals_match_reference(method, dirs) -> None:
    from safetensors.torch import load_file

    from tests.tiny_models import load_hf

    k = 3
    llm = LLM(dirs["target"], speculative_config=_spec(method, dirs[method], k),
              kv_cache_memory="64MiB", max_num_batched_tokens=16, max_num_seqs=4,
              **COMMON)  # fmt: skip
    drafter = llm.llm_engine.engine_core.executor.worker.drafter
    batch, propose, seen = drafter.batch, drafter.propose, []

    def spy(req_ids, rows, step=None):
        out = propose(req_ids, rows, step)
        for r, row in zip(req_ids, rows.tolist()):
            if r in out:
                n = int(batch.num_tokens[row])
                seen.append((batch.token_ids[row, :n].tolist(), out[r]))
        return out

    drafter.propose = spy
    _generate(llm, _prompts(4), temperature=0)  # chunked prefill (16-token steps)
    assert len(seen) > 10
    target, w = (
        load_hf(Path(dirs["target"])),
        load_file(str(Path(dirs[method]) / "model.safetensors")),
    )
    for tokens, drafts in seen[:: max(1, len(seen) // 12)]:
        assert drafts == _ref_drafts(method, target, w, tokens, len(drafts)), tokens


# ----- the engine end to end -----


@pytest.mark.parametrize("method,k", [("eagle", 3), ("eagle3", 4)])
def test_greedy_identical(method, k, dirs, greedy_reference) -> None:
    prompts = _prompts(0)
    llm = LLM(dirs["target"], speculative_config=_spec(method, dirs[method], k),
              kv_cache_memory="64MiB", max_num_batched_tokens=16, max_num_seqs=4,
              **COMMON)  # fmt: skip
    assert _generate(llm, prompts, temperature=0) == greedy_reference  # chunked prefill
    assert _generate(llm, prompts, temperature=0) == greedy_reference, "prefix-cache hits"
    stats = llm.llm_engine.get_stats()
    assert stats.num_drafts > 0 and stats.num_draft_tokens >= stats.num_drafts
    assert stats.prefix_cache_stats.hits > 0
    tight = LLM(dirs["target"], speculative_config=_spec(method, dirs[method], k),
                num_gpu_blocks_override=7, max_num_seqs=6, block_size=16,
                **{**COMMON, "max_model_len": 112})  # fmt: skip
    assert _generate(tight, prompts, temperature=0) == greedy_reference
    assert tight.llm_engine.get_stats().num_preemptions > 0


@pytest.mark.parametrize("method", ["eagle", "eagle3"])
def test_no_block_leaked_random_abort(method, dirs, greedy_reference) -> None:
    rnd = random.Random(7)
    prompts = _prompts(0)
    llm = LLM(dirs["target"], speculative_config=_spec(method, dirs[method], 3),
              num_gpu_blocks_override=17, block_size=8, max_num_seqs=4,
              max_num_batched_tokens=24, **{**COMMON, "max_model_len": 128})  # fmt: skip
    engine = llm.llm_engine
    outputs: dict[str, list[int]] = {}
    live: list[str] = []
    aborted: set[str] = set()

    def step() -> None:
        for out in engine.step():
            outputs[out.request_id] = out.outputs[0].token_ids
            if out.finished and out.request_id in live:
                live.remove(out.request_id)

    order = list(range(len(prompts))) * 2
    rnd.shuffle(order)
    for n, i in enumerate(order):
        temperature = 0 if rnd.random() < 0.6 else 0.9
        sp = SamplingParams(max_tokens=MAX_TOKENS[i], ignore_eos=True, temperature=temperature)
        req_id = f"{n}:{i}:{temperature}"
        engine.add_request(req_id, {"prompt_token_ids": prompts[i]}, sp)
        live.append(req_id)
        for _ in range(rnd.randrange(0, 4)):
            step()
        if rnd.random() < 0.3 and live:
            victim = rnd.choice(live)
            engine.abort_request([victim])
            live.remove(victim)
            aborted.add(victim)
    while engine.has_unfinished_requests():
        step()
    scheduler = engine.engine_core.scheduler
    assert scheduler.kv_cache_manager.pool.num_free_blocks == engine.engine_core.num_blocks
    assert not scheduler.kv_cache_manager.req_to_blocks and not scheduler.worker_drafts
    for req_id, tokens in outputs.items():
        _, i, temperature = req_id.split(":")
        if req_id not in aborted and float(temperature) == 0:
            assert tokens == greedy_reference[int(i)], req_id
    assert engine.get_stats().num_drafts > 0


def _predicting_pair(root: Path) -> tuple[str, str]:
    """A head that predicts what the target does, trained on nothing: a one-layer target whose
    attention is off (o_proj zero: its next token depends on the current one alone), and an
    EAGLE head whose layer is the target's and whose fc passes the token's embedding through
    (row p reads token p + 1: the head computes the target's residual stream at p + 1, and the
    target's LM head, whose final norm only rescales a row, takes the same argmax)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = {**_BASE, **ARCHS["llama"], "num_hidden_layers": 1}
    torch.manual_seed(3)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg), dtype=torch.float32)
    with torch.no_grad():
        model.model.layers[0].self_attn.o_proj.weight.zero_()
    model.save_pretrained(root / "target")
    make_tokenizer(root / "target")
    tensors = {
        name.removeprefix("model."): t.clone()
        for name, t in model.state_dict().items()
        if name.startswith("model.layers.0.") and "input_layernorm" not in name
    }
    tensors["fc.weight"] = torch.cat([torch.eye(H), torch.zeros(H, H)], 1)
    head = root / "head"
    head.mkdir()
    (head / "config.json").write_text(json.dumps({**cfg, "architectures": ["LlamaForCausalLM"]}))
    save_file(tensors, str(head / "model.safetensors"))
    return str(root / "target"), str(head)


def test_predicting_head_accepted(tmp_path) -> None:
    target, head = _predicting_pair(tmp_path)
    prompts = _prompts(5)
    want = _generate(LLM(target, kv_cache_memory="64MiB", **COMMON), prompts, temperature=0)
    llm = LLM(target, speculative_config=_spec("eagle", head, 3), kv_cache_memory="64MiB",
              **COMMON)  # fmt: skip
    assert _generate(llm, prompts, temperature=0) == want
    stats = llm.llm_engine.get_stats()
    assert stats.num_draft_tokens > 30 and stats.spec_acceptance_rate > 0.9


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_eagle(dirs, tmp_path) -> None:
    """On CUDA (Triton attention, decode graphs between verify steps, whose replays fill the
    hidden-state buffer): greedy output equals the one without speculation for both heads,
    and the predicting head is accepted."""
    common = dict(dtype="float32", max_model_len=256, kv_cache_memory="256MiB", seed=0)
    prompts = _prompts(3)
    want = _generate(LLM(dirs["target"], **common), prompts, temperature=0)
    for method, k in (("eagle", 4), ("eagle3", 4), ("eagle3", 1)):
        llm = LLM(dirs["target"], speculative_config=_spec(method, dirs[method], k), **common)
        assert _generate(llm, prompts, temperature=0) == want, method
        assert llm.llm_engine.get_stats().num_drafts > 0
    target, head = _predicting_pair(tmp_path)
    want = _generate(LLM(target, **common), prompts, temperature=0)
    llm = LLM(target, speculative_config=_spec("eagle", head, 3), **common)
    assert _generate(llm, prompts, temperature=0) == want
    assert llm.llm_engine.get_stats().spec_acceptance_rate > 0.9
