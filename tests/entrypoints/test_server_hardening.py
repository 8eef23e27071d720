"""A real server against hostile and careless requests: values the engine cannot represent
(64-bit overflows, NaN, lone surrogates, max_tokens past the context) are 400s in OpenAI's
shape naming the parameter, on a connection that stays open; the server keeps serving, ends
idle, and exits 0 on SIGTERM. Plus the sampling defaults from the generation config and
`--default-max-tokens`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.entrypoints.conftest import RemoteServer, httpx, tiny_server_args

MODEL = "tiny"

# (route, body as JSON text (NaN and lone surrogates need raw text), the parameter named).
HOSTILE = [
    ("/v1/completions", {"prompt": "hi", "top_k": 2**63}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "top_k": 2**64}, "top_k"),
    ("/v1/completions", {"prompt": "hi", "top_k": 513}, "top_k"),  # the vocabulary is 512
    ("/v1/completions", {"prompt": "hi", "seed": 2**64}, "seed"),
    ("/v1/completions", {"prompt": "hi", "seed": -(2**63) - 1}, "seed"),
    ("/v1/completions", {"prompt": "hi", "seed": 10**30}, "seed"),
    ("/v1/completions", {"prompt": "hi", "stop": ["\udfff"]}, "stop"),
    ("/v1/completions", {"prompt": "hi", "stop": "ok\ud800"}, "stop"),
    ("/v1/completions", {"prompt": "\ud800"}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", "x\udc00"]}, "prompt"),
    ("/v1/completions", {"prompt": "hi", "temperature": float("nan")}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "temperature": float("inf")}, "temperature"),
    ("/v1/completions", {"prompt": "hi", "top_p": float("nan")}, "top_p"),
    ("/v1/completions", {"prompt": "hi", "presence_penalty": float("-inf")}, "presence_penalty"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": float("nan")}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "logit_bias": {"5": 10**400}}, "logit_bias"),
    ("/v1/completions", {"prompt": "hi", "min_tokens": 2**70, "max_tokens": None}, "min_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 2**64}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": 100_000}, "max_tokens"),
    ("/v1/completions", {"prompt": "hi", "bad_words": ["\ud800"]}, "bad_words"),
    ("/v1/completions", {"prompt": "hi", "model": "x\ud800"}, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages"),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": [{"type": "text", "text": "\udfff"}]}]},
        "messages",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 5000},
        "max_completion_tokens",
    ),
    (
        "/v1/chat/completions",
        {"messages": [{"role": "user", "content": "hi"}], "temperature": float("nan")},
        "temperature",
    ),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
    ("/tokenize", {"prompt": 5}, "prompt"),
]


@pytest.fixture(scope="module")
def server(tiny_server: RemoteServer) -> RemoteServer:
    return tiny_server


@pytest.fixture(scope="module")
def http(server: RemoteServer):
    """One client, so one keep-alive connection: an error must not close it."""
    with httpx.Client(base_url=server.base_url, headers=server.headers(), timeout=60) as client:
        yield client


def post_raw(http, path: str, body: dict):
    data = json.dumps(body, allow_nan=True)  # NaN, Infinity and "\ud800" escapes, as sent
    return http.post(path, content=data, headers={"Content-Type": "application/json"})


def assert_openai_error(response, status: int, param: str | None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"]
    assert error["type"] == ("invalid_request_error" if status < 500 else error["type"])
    assert error["param"] == param, error
    assert "Traceback" not in error["message"] and "/site-packages/" not in error["message"]
    return error


def assert_serving(http) -> None:
    good = {"model": MODEL, "prompt": [5, 6, 7], "max_tokens": 3, "ignore_eos": True}
    response = http.post("/v1/completions", json=good)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["completion_tokens"] == 3
    assert http.get("/health").status_code == 200


@pytest.mark.parametrize(("path", "body", "param"), HOSTILE)
def test_hostile_value_is_a_400_naming_it(server, http, path: str, body: dict, param: str) -> None:
    response = post_raw(http, path, {"model": MODEL, **body})
    assert_openai_error(response, 400, param)
    assert response.headers.get("connection", "").lower() != "close"
    assert_serving(http)


def test_max_tokens_past_the_context_names_the_room_left(http) -> None:
    ids = [5, 6, 7, 8] * 250  # 1000 of max_model_len 1024: room for 24
    response = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 25})
    error = assert_openai_error(response, 400, "max_tokens")
    assert error["code"] == "context_length_exceeded" and "at most 24" in error["message"]
    ok = http.post("/v1/completions", json={"prompt": ids, "max_tokens": 24, "ignore_eos": True})
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 24


def test_many_bad_requests_leave_the_server_serving_and_idle(server, http) -> None:
    for i in range(40):
        path, body, param = HOSTILE[i % len(HOSTILE)]
        assert_openai_error(post_raw(http, path, {"model": MODEL, **body}), 400, param)
    assert_serving(http)
    metrics = server.metrics()
    assert metrics["pagedllm:num_requests_running"] == 0
    assert metrics["pagedllm:num_requests_waiting"] == 0
    assert metrics["pagedllm:kv_cache_usage_perc"] == 0


def test_no_cors_headers_unless_asked(server, http) -> None:
    origin = {"Origin": "https://anywhere.example"}
    response = http.get("/v1/models", headers=origin)
    assert response.status_code == 200 and "access-control-allow-origin" not in response.headers
    preflight = http.options(
        "/v1/completions", headers={**origin, "Access-Control-Request-Method": "POST"}
    )
    assert "access-control-allow-origin" not in preflight.headers


def test_request_chat_templates_are_refused_unless_trusted(http) -> None:
    messages = [{"role": "user", "content": "hi"}]
    response = http.post(
        "/v1/chat/completions",
        json={"model": MODEL, "messages": messages, "chat_template": "{{ messages }}"},
    )
    assert_openai_error(response, 400, "chat_template")
    tokenized = http.post("/tokenize", json={"messages": messages, "chat_template": "{{ 1 }}"})
    assert_openai_error(tokenized, 400, "chat_template")


def test_sigterm_after_hostile_load_exits_0(server) -> None:
    assert server.stop() == 0


@pytest.fixture(scope="module")
def configured_server(tiny_model_dirs, tmp_path_factory):
    """A server with a generation config (max_new_tokens 9, greedy) and --default-max-tokens 6."""
    folder: Path = tmp_path_factory.mktemp("genconfig")
    (folder / "generation_config.json").write_text(
        json.dumps({"temperature": 0.0, "max_new_tokens": 9, "do_sample": True})
    )
    args = tiny_server_args(
        tiny_model_dirs["llama"],
        tmp_path_factory.mktemp("server"),
        "--served-model-name",
        MODEL,
        "--generation-config",
        str(folder),
        "--default-max-tokens",
        "6",
    )
    server = RemoteServer(args, api_key=None)
    yield server
    server.stop()


def test_generation_config_and_default_max_tokens(configured_server: RemoteServer) -> None:
    client = configured_server.client()
    messages = [{"role": "user", "content": "Hello there"}]
    extra = {"ignore_eos": True}
    # No max_tokens: the smaller of --default-max-tokens (6) and max_new_tokens (9).
    out = client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra)
    assert out.usage.completion_tokens == 6
    # Greedy from the generation config: the same tokens each time, as temperature=0 gives.
    again = client.chat.completions.create(model=MODEL, messages=messages, extra_body=extra)
    greedy = client.chat.completions.create(
        model=MODEL, messages=messages, temperature=0, extra_body=extra
    )
    assert out.choices[0].message.content == again.choices[0].message.content
    assert out.choices[0].message.content == greedy.choices[0].message.content
    # An explicit max_tokens is not capped by the defaults.
    long = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=20, extra_body=extra
    )
    assert long.usage.completion_tokens == 20
