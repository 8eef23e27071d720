"""The OpenAI-compatible server end to end: the official `openai` client against `pagedllm serve`
on loopback (a tiny random llama), checked against the offline `LLM` and HF transformers."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time

import openai
import pytest
import torch

from pagedllm import LLM, SamplingParams
from pagedllm.benchmarks.serve import build_prompts
from tests.entrypoints.conftest import API_KEY, CHATML, CLI, RemoteServer, httpx
from tests.tiny_models import VOCAB_SIZE, load_hf

MODEL = "tiny"
PROMPTS = ["The quick brown fox", "Paged attention stores", "Hello world! Numbers"]


@pytest.fixture(scope="module")
def server(tiny_server: RemoteServer) -> RemoteServer:
    return tiny_server


@pytest.fixture(scope="module")
def client(server: RemoteServer) -> openai.OpenAI:
    return server.client()


@pytest.fixture(scope="module")
def llm(tiny_model_dirs) -> LLM:
    """The offline engine on the same model: the reference for exact outputs."""
    return LLM(tiny_model_dirs["llama"], dtype="float32", kv_cache_memory="16MiB")


@pytest.fixture(scope="module")
def hf(tiny_model_dirs):
    return load_hf(tiny_model_dirs["llama"])


def greedy(llm: LLM, prompts: list, max_tokens: int) -> list[str]:
    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    return [o.outputs[0].text for o in llm.generate(prompts, params, use_tqdm=False)]


def assert_serving(client: openai.OpenAI) -> None:
    """The server still answers a good request (after an error)."""
    out = client.completions.create(model=MODEL, prompt="Hello", max_tokens=2, temperature=0)
    assert out.choices[0].finish_reason in ("length", "stop")


def hf_logprobs(hf, ids: list[int]) -> torch.Tensor:
    """log_softmax of HF's logits at every position of `ids` (row i predicts ids[i + 1])."""
    with torch.no_grad():
        logits = hf(torch.tensor([ids])).logits[0].float()
    return torch.log_softmax(logits, dim=-1)


# ----- plain requests -----


def test_models_version_health(server: RemoteServer, client: openai.OpenAI) -> None:
    names = [m.id for m in client.models.list().data]
    assert names == ["tiny", "tiny-alias"]
    assert client.models.retrieve("tiny-alias").id == "tiny-alias"
    assert httpx.get(server.url("/health")).status_code == 200  # open without the key
    from pagedllm import __version__

    version = httpx.get(server.url("/version"), headers=server.headers())
    assert version.json() == {"version": __version__}
    # A served alias works as the model name; responses report the first name.
    out = client.completions.create(model="tiny-alias", prompt="Hi", max_tokens=1)
    assert out.model == "tiny"


def test_completion_matches_offline_engine(client: openai.OpenAI, llm: LLM) -> None:
    expected = greedy(llm, PROMPTS, 12)
    for prompt, text in zip(PROMPTS, expected):
        out = client.completions.create(
            model=MODEL,
            prompt=prompt,
            max_tokens=12,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
        assert out.object == "text_completion" and out.id.startswith("cmpl-")
        assert out.choices[0].text == text
        assert out.choices[0].finish_reason == "length"
    # Several prompts in one request, as text and as token ids: choice i answers prompt i.
    ids = [llm.get_tokenizer().encode(p) for p in PROMPTS]
    for batch in (PROMPTS, ids):
        out = client.completions.create(
            model=MODEL, prompt=batch, max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
        )
        assert [c.index for c in out.choices] == [0, 1, 2]
        assert [c.text for c in out.choices] == expected
        assert out.usage.prompt_tokens == sum(len(i) for i in ids)
        assert out.usage.completion_tokens == 36


def test_chat_matches_offline_engine(client: openai.OpenAI, llm: LLM) -> None:
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "The quick brown fox"},
    ]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    ref = llm.chat(messages, params, use_tqdm=False, chat_template=CHATML)[0]
    out = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_completion_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out.object == "chat.completion"
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == ref.outputs[0].text
    assert out.usage.prompt_tokens == len(ref.prompt_token_ids)
    assert out.usage.completion_tokens == 10
    # Content given as text parts is the same message.
    parts = [{"type": "text", "text": "The quick brown fox"}]
    out2 = client.chat.completions.create(
        model=MODEL,
        messages=[messages[0], {"role": "user", "content": parts}],
        max_tokens=10,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    assert out2.choices[0].message.content == ref.outputs[0].text


def _stream_completion(client: openai.OpenAI, **kwargs) -> tuple[dict[int, str], dict, object]:
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    usage = None
    for chunk in client.completions.create(stream=True, **kwargs):
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for c in chunk.choices:
            texts[c.index] = texts.get(c.index, "") + c.text
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    return texts, finish, usage


def _stream_chat(client: openai.OpenAI, **kwargs) -> tuple[dict[int, str], dict, object]:
    texts: dict[int, str] = {}
    finish: dict[int, str | None] = {}
    usage = None
    roles = set()
    for chunk in client.chat.completions.create(stream=True, **kwargs):
        assert chunk.object == "chat.completion.chunk"
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            if c.delta.role is not None:
                roles.add((c.index, c.delta.role))
            texts[c.index] = texts.get(c.index, "") + (c.delta.content or "")
            if c.finish_reason is not None:
                finish[c.index] = c.finish_reason
    assert roles == {(i, "assistant") for i in texts}
    return texts, finish, usage


def test_streamed_deltas_equal_the_whole_text_under_a_seed(client: openai.OpenAI) -> None:
    common = dict(model=MODEL, max_tokens=20, temperature=0.9, seed=1234)
    whole = client.completions.create(prompt="The quick brown fox", **common)
    texts, finish, usage = _stream_completion(
        client, prompt="The quick brown fox", stream_options={"include_usage": True}, **common
    )
    assert texts == {0: whole.choices[0].text}
    assert finish == {0: whole.choices[0].finish_reason}
    assert usage == whole.usage
    # Without include_usage, no usage chunk.
    assert _stream_completion(client, prompt="The quick brown fox", **common)[2] is None

    messages = [{"role": "user", "content": "Paged attention"}]
    whole_chat = client.chat.completions.create(messages=messages, **common)
    texts, finish, usage = _stream_chat(
        client, messages=messages, stream_options={"include_usage": True}, **common
    )
    assert texts == {0: whole_chat.choices[0].message.content}
    assert finish == {0: whole_chat.choices[0].finish_reason}
    assert usage == whole_chat.usage


def test_n_samples(client: openai.OpenAI) -> None:
    common = dict(model=MODEL, max_tokens=12, temperature=1.0, seed=7, n=2)
    extra = {"ignore_eos": True}
    out = client.completions.create(prompt=PROMPTS[:2], extra_body=extra, **common)
    assert [c.index for c in out.choices] == [0, 1, 2, 3]  # prompt i's sample j is i * n + j
    assert out.choices[0].text != out.choices[1].text  # seeds seed, seed + 1: different samples
    assert out.usage.completion_tokens == 4 * 12
    texts, finish, _ = _stream_completion(client, prompt=PROMPTS[:2], extra_body=extra, **common)
    assert texts == {c.index: c.text for c in out.choices}
    assert finish == {i: "length" for i in range(4)}

    messages = [{"role": "user", "content": "Hello"}]
    chat = client.chat.completions.create(messages=messages, extra_body=extra, **common)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.usage.completion_tokens == 24
    texts, _, _ = _stream_chat(client, messages=messages, extra_body=extra, **common)
    assert texts == {c.index: c.message.content for c in chat.choices}


def test_completion_logprobs_match_hf(client: openai.OpenAI, llm: LLM, hf) -> None:
    prompt = "Paged attention stores"
    prompt_ids = llm.get_tokenizer().encode(prompt)
    out = client.completions.create(
        model=MODEL,
        prompt=prompt_ids,
        max_tokens=6,
        temperature=0,
        logprobs=3,
        echo=True,
        extra_body={"ignore_eos": True},
    )
    lp = out.choices[0].logprobs
    n_prompt = len(prompt_ids)
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == n_prompt + 6
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # no logprob for token 0
    assert out.choices[0].text.startswith(llm.get_tokenizer().decode(prompt_ids))
    # The sampled ids: greedy, so each generated token is HF's argmax.
    gen = (
        llm.generate(
            [prompt_ids],
            SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
            use_tqdm=False,
        )[0]
        .outputs[0]
        .token_ids
    )
    ref = hf_logprobs(hf, prompt_ids + gen)
    all_ids = prompt_ids + gen
    for pos in range(1, len(all_ids)):
        expected = ref[pos - 1, all_ids[pos]].item()
        assert lp.token_logprobs[pos] == pytest.approx(expected, abs=1e-3), pos
        # The top 3 (plus the chosen token, when it is not among them), best first; tokens
        # with the same text (bytes of one character) share a key.
        top = lp.top_logprobs[pos]
        ref_top = torch.topk(ref[pos - 1], 4).values.tolist()
        assert max(top.values()) == pytest.approx(ref_top[0], abs=1e-3)
        for value in top.values():
            assert min(abs(value - r) for r in ref_top + [expected]) < 1e-3
    assert lp.text_offset[0] == 0 and lp.text_offset == sorted(lp.text_offset)
    # vLLM's prompt_logprobs: {token id: {logprob, rank, decoded_token}} per prompt token.
    out = client.completions.create(
        model=MODEL, prompt=prompt_ids, max_tokens=1, extra_body={"prompt_logprobs": 2}
    )
    plp = out.choices[0].model_extra["prompt_logprobs"]
    assert len(plp) == n_prompt and plp[0] is None
    for pos in range(1, n_prompt):
        entry = plp[pos][str(prompt_ids[pos])]
        assert entry["logprob"] == pytest.approx(ref[pos - 1, prompt_ids[pos]].item(), abs=1e-3)
        assert entry["rank"] == int((ref[pos - 1] > ref[pos - 1, prompt_ids[pos]]).sum()) + 1


def test_chat_logprobs_match_hf(client: openai.OpenAI, llm: LLM, hf) -> None:
    messages = [{"role": "user", "content": "Hello world"}]
    out = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    prompt_ids = llm.render_chat(messages, chat_template=CHATML)["prompt_token_ids"]
    ref_out = llm.chat(
        messages,
        SamplingParams(temperature=0, max_tokens=5, ignore_eos=True),
        use_tqdm=False,
        chat_template=CHATML,
    )[0].outputs[0]
    ref = hf_logprobs(hf, prompt_ids + ref_out.token_ids)
    for i, item in enumerate(content):
        row = ref[len(prompt_ids) - 1 + i]
        assert item.logprob == pytest.approx(row[ref_out.token_ids[i]].item(), abs=1e-3)
        assert len(item.top_logprobs) == 2
        assert [t.logprob for t in item.top_logprobs] == pytest.approx(
            torch.topk(row, 2).values.tolist(), abs=1e-3
        )
        assert item.top_logprobs[0].token == item.token  # greedy: the chosen token is the best
        assert bytes(item.bytes) == item.token.encode()
    # Streamed, the same logprobs arrive piece by piece.
    streamed = []
    for chunk in client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=5,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
        stream=True,
        extra_body={"ignore_eos": True},
    ):
        for c in chunk.choices:
            if c.logprobs is not None:
                streamed += c.logprobs.content
    assert [s.token for s in streamed] == [c.token for c in content]
    assert [s.logprob for s in streamed] == pytest.approx([c.logprob for c in content])


def test_stop_strings_and_tokens(client: openai.OpenAI, llm: LLM) -> None:
    common = dict(model=MODEL, prompt="The quick brown fox", temperature=0)
    full = client.completions.create(max_tokens=16, extra_body={"ignore_eos": True}, **common)
    text = full.choices[0].text
    stop = text[5:8]
    assert stop.strip(), f"pick another slice of {text!r}"
    cut = client.completions.create(max_tokens=16, stop=[stop], **common)
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].model_extra["stop_reason"] == stop
    texts, finish, _ = _stream_completion(client, max_tokens=16, stop=stop, **common)
    assert texts == {0: cut.choices[0].text} and finish == {0: "stop"}
    # A stop token id ends the text where the offline engine ends it.
    tokenizer_ids = llm.get_tokenizer().encode("The quick brown fox")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    gen = llm.generate([tokenizer_ids], params, use_tqdm=False)[0].outputs[0].token_ids
    stop_id = next(t for i, t in enumerate(gen) if i >= 2 and t not in gen[:i])
    out = client.completions.create(
        max_tokens=16, extra_body={"stop_token_ids": [stop_id]}, **common
    )
    params = SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id])
    ref = llm.generate([tokenizer_ids], params, use_tqdm=False)[0].outputs[0]
    assert out.choices[0].finish_reason == "stop" and ref.finish_reason == "stop"
    assert out.choices[0].text == ref.text
    assert out.usage.completion_tokens == len(ref.token_ids) == gen.index(stop_id) + 1


def test_usage_and_max_tokens(server: RemoteServer, client: openai.OpenAI) -> None:
    prompt = "Continuous batching keeps the accelerator busy."
    count = server.post("/tokenize", json={"prompt": prompt}).json()["count"]
    out = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=7, extra_body={"ignore_eos": True}
    )
    assert (out.usage.prompt_tokens, out.usage.completion_tokens) == (count, 7)
    assert out.usage.total_tokens == count + 7
    # max_tokens beyond the room the context leaves is a 400, as vLLM and OpenAI answer
    # (max_model_len 1024); exactly the room is fine.
    ids = [5, 6, 7, 8] * 255
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=ids, max_tokens=50, temperature=0)
    assert info.value.code == "context_length_exceeded"
    assert "max_tokens must be at most 4" in info.value.message
    out = client.completions.create(
        model=MODEL, prompt=ids, max_tokens=4, temperature=0, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 4 and out.choices[0].finish_reason == "length"


def test_tokenize_and_detokenize(server: RemoteServer, llm: LLM) -> None:
    tokenizer = llm.get_tokenizer()
    text = "Paged attention stores keys and values in blocks."
    body = server.post("/tokenize", json={"model": MODEL, "prompt": text}).json()
    assert body["tokens"] == tokenizer.encode(text)
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 1024
    back = server.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]}).json()
    assert back["prompt"] == tokenizer.decode(body["tokens"])
    messages = [{"role": "user", "content": "Hi"}]
    chat = server.post("/tokenize", json={"messages": messages}).json()
    assert chat["tokens"] == llm.render_chat(messages, chat_template=CHATML)["prompt_token_ids"]


def test_echo_chat_continues_the_final_message(client: openai.OpenAI) -> None:
    messages = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "The quick"},
    ]
    out = client.chat.completions.create(
        model=MODEL,
        messages=messages,
        max_tokens=4,
        temperature=0,
        extra_body={"echo": True, "add_generation_prompt": False, "continue_final_message": True},
    )
    assert out.choices[0].message.content.startswith("The quick")


# ----- errors: each one answered, then the server keeps serving -----


def _expect(status: int, response, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param
    return body["error"]


BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "x", "temperature": -1}, "temperature"),
    ("/v1/completions", {"prompt": "x", "temperature": "hot"}, "temperature"),
    ("/v1/completions", {"prompt": "x", "top_p": 0}, "top_p"),
    ("/v1/completions", {"prompt": "x", "n": 0}, "n"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "logprobs": 50}, "logprobs"),
    ("/v1/completions", {"prompt": "x", "logit_bias": {"99999": 1}}, "logit_bias"),
    ("/v1/completions", {"prompt": "x", "stream": True, "temperature": -1}, "temperature"),
    ("/v1/completions", {"max_tokens": 3}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [1, 2, VOCAB_SIZE + 3]}, "prompt"),
    ("/v1/completions", {"prompt": [5] * 1100}, "prompt"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": "hi"}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 1100}]}, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
        "messages",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
        "top_logprobs",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "x"}], "stream": True, "min_p": 2},
        "min_p",
    ),
    ("/detokenize", {"tokens": [VOCAB_SIZE + 1]}, "tokens"),
]


@pytest.mark.parametrize(("path", "body", "param"), BAD_REQUESTS)
def test_bad_request_is_400(server, client, path: str, body: dict, param: str) -> None:
    _expect(400, server.post(path, json=body), param)
    assert_serving(client)


def test_openai_client_raises_bad_request(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[5] * 1100, max_tokens=5)
    assert "maximum context length is 1024" in info.value.message
    assert info.value.code == "context_length_exceeded"
    assert_serving(client)


def test_malformed_json_is_400(server: RemoteServer, client: openai.OpenAI) -> None:
    for content in (b'{"prompt": "x",', b"not json", b""):
        response = server.post(
            "/v1/completions", content=content, headers={"Content-Type": "application/json"}
        )
        _expect(400, response)
        assert_serving(client)


def test_unknown_model_is_404(server: RemoteServer, client: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        client.completions.create(model="gpt-17", prompt="x", max_tokens=2)
    assert info.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-17")
    _expect(404, server.post("/v1/nothing-here", json={}))
    assert_serving(client)


def test_api_key_is_required(server: RemoteServer, client: openai.OpenAI) -> None:
    for key in ("wrong", API_KEY + "x"):
        with pytest.raises(openai.AuthenticationError):
            server.client(api_key=key).completions.create(model=MODEL, prompt="x", max_tokens=2)
    for path in ("/v1/completions", "/v1/models", "/tokenize"):
        error = _expect(401, httpx.post(server.url(path), json={"prompt": "x"}))
        assert error["code"] == "invalid_api_key"
    _expect(401, httpx.get(server.url("/v1/models")))
    # Malformed JSON without the key is refused for the key first.
    _expect(401, httpx.post(server.url("/v1/completions"), content=b"{"))
    # Every route but /health needs the key: /version, /metrics and the OpenAPI schema too.
    assert httpx.get(server.url("/health")).status_code == 200
    for path in ("/version", "/metrics", "/openapi.json", "/docs"):
        _expect(401, httpx.get(server.url(path)))
        assert httpx.get(server.url(path), headers=server.headers()).status_code == 200
    assert_serving(client)


# ----- load and lifecycle -----


def test_64_concurrent_streams_all_complete(client: openai.OpenAI, server: RemoteServer) -> None:
    prompts = [f"{PROMPTS[i % 3]} {i}" for i in range(64)]
    extra = {"ignore_eos": True}
    whole = client.completions.create(
        model=MODEL, prompt=prompts, max_tokens=8, temperature=0, extra_body=extra
    )
    expected = {c.index: c.text for c in whole.choices}

    async def one(aclient, i: int) -> tuple[str, str | None, int]:
        text, finish, tokens = "", None, 0
        stream = await aclient.completions.create(
            model=MODEL,
            prompt=prompts[i],
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
            extra_body=extra,
        )
        async for chunk in stream:
            for c in chunk.choices:
                text += c.text
                finish = c.finish_reason or finish
            if chunk.usage is not None:
                tokens = chunk.usage.completion_tokens
        return text, finish, tokens

    async def run() -> list[tuple[str, str | None, int]]:
        async with server.async_client() as aclient:
            return await asyncio.gather(*(one(aclient, i) for i in range(64)))

    results = asyncio.run(run())
    assert [r[0] for r in results] == [expected[i] for i in range(64)]
    assert all(r[1] == "length" and r[2] == 8 for r in results)


def _wait_idle(server: RemoteServer, timeout: float = 20) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        if m["pagedllm:num_requests_running"] == 0 and m["pagedllm:kv_cache_usage_perc"] == 0:
            return m
        assert time.monotonic() < deadline, f"not idle: {m}"
        time.sleep(0.1)


def test_disconnect_mid_stream_aborts_the_request(server: RemoteServer) -> None:
    before = _wait_idle(server)
    max_tokens = 900
    body = {
        "model": MODEL,
        "prompt": "The quick brown fox",
        "max_tokens": max_tokens,
        "ignore_eos": True,
        "stream": True,
    }
    with (
        httpx.Client(timeout=60) as http,
        http.stream(
            "POST", server.url("/v1/completions"), json=body, headers=server.headers()
        ) as response,
    ):
        assert response.status_code == 200
        chunks = 0
        for line in response.iter_lines():
            chunks += line.startswith("data:")
            if chunks == 3:
                running = server.metrics()["pagedllm:num_requests_running"]
                break  # NOTE: leaving the line iterator closes the connection
    assert running == 1  # it was running when the client went away
    after = _wait_idle(server)
    generated = (
        after["pagedllm:generation_tokens_total"] - before["pagedllm:generation_tokens_total"]
    )
    assert 3 <= generated < max_tokens  # aborted, not run to the end


def test_disconnect_before_a_whole_response_aborts_it(server: RemoteServer) -> None:
    before = _wait_idle(server)
    body = {"model": MODEL, "prompt": "Hello", "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url("/v1/completions"), json=body, headers=server.headers(), timeout=1.0)
    after = _wait_idle(server)
    generated = (
        after["pagedllm:generation_tokens_total"] - before["pagedllm:generation_tokens_total"]
    )
    assert 0 < generated < 900


def test_metrics_count_tokens(server: RemoteServer, client: openai.OpenAI) -> None:
    before = _wait_idle(server)
    out = client.completions.create(
        model=MODEL, prompt=[5, 6, 7, 8], max_tokens=6, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 6
    after = _wait_idle(server)
    assert (
        after["pagedllm:generation_tokens_total"] - before["pagedllm:generation_tokens_total"] == 6
    )
    assert after["pagedllm:prompt_tokens_total"] - before["pagedllm:prompt_tokens_total"] == 4
    text = httpx.get(server.url("/metrics"), headers=server.headers()).text
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds"):
        assert f"pagedllm:{name}_bucket" in text


# ----- the benchmark client -----


def _bench(server: RemoteServer, *args: str) -> dict:
    cmd = [
        *CLI,
        "bench",
        "serve",
        "--base-url",
        server.base_url,
        "--api-key",
        API_KEY,
        "--vocab-size",
        str(VOCAB_SIZE),
        "--input-len",
        "10",
        "40",
        "--output-len",
        "4",
        "24",
        "--max-output-len",
        "16",
        "--json",
        *args,
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def test_bench_serve_against_the_server(server: RemoteServer) -> None:
    expected = build_prompts(6, (10, 40), (4, 24), 16, VOCAB_SIZE, seed=3)
    summary = _bench(server, "--num-prompts", "6", "--request-rate", "20", "--seed", "3")
    assert summary["completed"] == 6 and summary["failed"] == 0, summary["errors"]
    assert summary["model"] == "tiny"  # the first name of GET /v1/models
    assert summary["total_output_tokens"] == sum(p.output_len for p in expected)
    assert summary["total_input_tokens"] == sum(p.prompt_len for p in expected)
    assert 0 < summary["p50_ttft_ms"] <= summary["p99_ttft_ms"] <= summary["duration_s"] * 1000
    assert summary["p50_itl_ms"] > 0 and summary["mean_tpot_ms"] > 0
    assert summary["output_throughput"] > 0
    # Text prompts through the chat endpoint, under a concurrency cap.
    summary = _bench(
        server,
        "--num-prompts",
        "4",
        "--max-concurrency",
        "2",
        "--endpoint",
        "/v1/chat/completions",
        "--tokenizer",
        server_model_dir(server),
    )
    assert summary["completed"] == 4 and summary["failed"] == 0, summary["errors"]


def server_model_dir(server: RemoteServer) -> str:
    return str(
        httpx.get(server.url("/v1/models"), headers=server.headers()).json()["data"][0]["root"]
    )


def test_bench_serve_counts_failures(server: RemoteServer) -> None:
    summary = _bench(server, "--num-prompts", "2", "--model", "no-such-model")
    assert summary["completed"] == 0 and summary["failed"] == 2
    assert any("404" in e for e in summary["errors"])
