"""`pagedllm bench serve` (T4): load on any OpenAI-compatible server, measured from the client.

Requests follow T1's length distribution (outputs capped at 512), arriving as a Poisson process
(`--request-rate`, inf = all at once) and/or under a concurrency cap (`--max-concurrency`). Each
is a streamed completion, so the client sees every token arrive: time to first token (TTFT),
time per output token after the first (TPOT), inter-token latency (ITL, between streamed chunks),
end-to-end latency, and request and token throughput over the run, with completed and failed
counts.

Prompts are random token ids (T1's), sent as `prompt: [ids]` (which /v1/completions accepts on
pagedllm, vLLM and other OpenAI-compatible servers); with `--tokenizer`, the ids are decoded to
text first, so servers that take only text prompts (and the chat endpoint) work too. Only the
standard streaming protocol is used (plus `ignore_eos`, a vLLM extra that `--no-ignore-eos`
leaves out), so the same client measures a peer server side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from pagedllm.benchmarks.workloads import t1_requests

T4_MAX_OUTPUT_LEN = 512
PERCENTILES = (50, 90, 99)


@dataclass
class BenchPrompt:
    prompt: str | list[int]
    prompt_len: int
    output_len: int


@dataclass
class RequestResult:
    ok: bool = False
    prompt_len: int = 0
    output_tokens: int = 0
    ttft: float = 0.0
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--base-url", default="http://127.0.0.1:8000", help="the server's root")
    parser.add_argument(
        "--endpoint", default="/v1/completions", help="/v1/completions or /v1/chat/completions"
    )
    parser.add_argument("--model", default=None, help="default: the first of GET /v1/models")
    parser.add_argument(
        "--api-key", default=os.environ.get("OPENAI_API_KEY"), help="default: $OPENAI_API_KEY"
    )
    parser.add_argument("--num-prompts", type=int, default=500)
    parser.add_argument(
        "--request-rate", type=float, default=math.inf, help="Poisson arrivals per second (inf)"
    )
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests at once")
    parser.add_argument("--seed", type=int, default=0, help="lengths; ids use +1, arrivals +2")
    parser.add_argument(
        "--input-len", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--output-len", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--max-output-len", type=int, default=T4_MAX_OUTPUT_LEN, help="cap on output lengths"
    )
    parser.add_argument(
        "--vocab-size", type=int, default=32000, help="prompt ids are drawn below this"
    )
    parser.add_argument(
        "--tokenizer", default=None, help="HF tokenizer folder: send prompts as decoded text"
    )
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument(
        "--ignore-eos",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="send ignore_eos (a vLLM extra) so every output has its drawn length",
    )
    parser.add_argument("--timeout", type=float, default=None, help="seconds per request")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--output-json", default=None, help="also write the results here")


# ----- workload -----


def build_prompts(
    num_prompts: int,
    input_len: tuple[int, int],
    output_len: tuple[int, int],
    max_output_len: int,
    vocab_size: int,
    seed: int,
    tokenizer: Any | None = None,
) -> list[BenchPrompt]:
    """T1's requests (lengths from Random(seed), ids from Random(seed + 1)), outputs capped."""
    prompts = []
    for req in t1_requests(num_prompts, input_len, output_len, vocab_size, seed):
        ids = req.prompt_token_ids
        prompt: str | list[int] = ids if tokenizer is None else tokenizer.decode(ids)
        prompts.append(BenchPrompt(prompt, len(ids), min(req.output_len, max_output_len)))
    return prompts


def arrival_delays(num: int, rate: float, seed: int) -> list[float]:
    """Gaps before each request: 0, then exponential with mean 1/rate (none for rate=inf)."""
    if math.isinf(rate):
        return [0.0] * num
    if rate <= 0:
        raise ValueError(f"--request-rate must be positive (or inf), got {rate}")
    rng = random.Random(seed)
    return [0.0] + [rng.expovariate(rate) for _ in range(num - 1)]


# ----- one request -----


def _payload(args: argparse.Namespace, model: str, p: BenchPrompt) -> dict[str, Any]:
    body: dict[str, Any] = {
        "model": model,
        "temperature": args.temperature,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.endpoint.rstrip("/").endswith("chat/completions"):
        if not isinstance(p.prompt, str):
            raise ValueError("the chat endpoint needs text prompts: pass --tokenizer")
        body["messages"] = [{"role": "user", "content": p.prompt}]
        body["max_completion_tokens"] = p.output_len
    else:
        body["prompt"] = p.prompt
        body["max_tokens"] = p.output_len
    if args.ignore_eos:
        body["ignore_eos"] = True
    return body


def _is_token_chunk(obj: dict[str, Any]) -> bool:
    """Whether a streamed chunk carries generated tokens: some text, or (a server without a
    tokenizer streams token ids only) an unfinished completion choice with empty text."""
    for choice in obj.get("choices") or []:
        if choice.get("text") or (choice.get("delta") or {}).get("content"):
            return True
        if "text" in choice and choice.get("finish_reason") is None:
            return True
    return False


async def send_request(
    client: Any, url: str, headers: dict[str, str], body: dict[str, Any], prompt_len: int
) -> RequestResult:
    """One streamed request, timed at every content chunk."""
    result = RequestResult(prompt_len=prompt_len)
    num_chunks = 0
    finished = False
    start = time.perf_counter()
    last = start
    try:
        async with client.stream("POST", url, json=body, headers=headers) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    finished = True
                    break
                obj = json.loads(data)
                if "error" in obj:
                    result.error = str(obj["error"].get("message", obj["error"]))
                    return result
                if obj.get("usage"):
                    result.output_tokens = obj["usage"].get("completion_tokens") or 0
                    result.prompt_len = obj["usage"].get("prompt_tokens") or prompt_len
                if _is_token_chunk(obj):
                    now = time.perf_counter()
                    if num_chunks == 0:
                        result.ttft = now - start
                    else:
                        result.itl.append(now - last)
                    last = now
                    num_chunks += 1
    except Exception as e:
        result.error = f"{type(e).__name__}: {e}"
        return result
    result.latency = time.perf_counter() - start
    if result.output_tokens == 0:
        result.output_tokens = num_chunks  # the server sent no usage: one token per chunk
    result.ok = finished and (num_chunks > 0 or result.output_tokens > 0)
    if not result.ok:
        result.error = "the stream ended early" if not finished else "the stream carried no output"
    return result


# ----- the run -----


def _http_module() -> Any:
    try:
        import httpx2 as httpx  # the name of httpx's current major release
    except ImportError:
        import httpx  # type: ignore[no-redef]
    return httpx


async def _first_model(client: Any, base_url: str, headers: dict[str, str]) -> str:
    response = await client.get(f"{base_url}/v1/models", headers=headers)
    response.raise_for_status()
    return str(response.json()["data"][0]["id"])


async def run_benchmark(args: argparse.Namespace, prompts: list[BenchPrompt]) -> dict[str, Any]:
    httpx = _http_module()
    base_url = args.base_url.rstrip("/")
    url = base_url + "/" + args.endpoint.lstrip("/")
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    timeout = httpx.Timeout(args.timeout)
    # NOTE: trust_env=False: no proxy from the environment between the client and the server
    # it measures (a proxy's latency would count as the server's).
    async with httpx.AsyncClient(limits=limits, timeout=timeout, trust_env=False) as client:
        model = args.model or await _first_model(client, base_url, headers)
        bodies = [_payload(args, model, p) for p in prompts]
        semaphore = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None

        async def one(body: dict[str, Any], prompt_len: int) -> RequestResult:
            if semaphore is None:
                return await send_request(client, url, headers, body, prompt_len)
            async with semaphore:
                return await send_request(client, url, headers, body, prompt_len)

        tasks = []
        start = time.perf_counter()
        for delay, body, p in zip(
            arrival_delays(len(prompts), args.request_rate, args.seed + 2), bodies, prompts
        ):
            if delay:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(body, p.prompt_len)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
    summary = summarize(results, duration)
    summary.update(
        base_url=base_url,
        endpoint=args.endpoint,
        model=model,
        request_rate=args.request_rate if not math.isinf(args.request_rate) else "inf",
        max_concurrency=args.max_concurrency,
    )
    return summary


def _stats(values: list[float], name: str) -> dict[str, float]:
    """Mean and percentiles, in milliseconds (zeros when there are no values)."""
    import numpy as np

    arr = np.asarray(values, dtype=float) * 1000.0
    out = {f"mean_{name}_ms": float(arr.mean()) if arr.size else 0.0}
    for q in PERCENTILES:
        out[f"p{q}_{name}_ms"] = float(np.percentile(arr, q)) if arr.size else 0.0
    return out


def summarize(results: list[RequestResult], duration: float) -> dict[str, Any]:
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    prompt_tokens = sum(r.prompt_len for r in done)
    summary: dict[str, Any] = {
        "num_prompts": len(results),
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": duration,
        "total_input_tokens": prompt_tokens,
        "total_output_tokens": output_tokens,
        "request_throughput": len(done) / duration if duration else 0.0,
        "output_throughput": output_tokens / duration if duration else 0.0,
        "total_token_throughput": (prompt_tokens + output_tokens) / duration if duration else 0.0,
    }
    tpots = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]
    summary.update(_stats([r.ttft for r in done], "ttft"))
    summary.update(_stats(tpots, "tpot"))
    summary.update(_stats([x for r in done for x in r.itl], "itl"))
    summary.update(_stats([r.latency for r in done], "e2el"))
    errors = sorted({r.error for r in results if not r.ok})
    summary["errors"] = errors[:10]
    return summary


def format_summary(s: dict[str, Any]) -> str:
    lines = [
        f"server {s['base_url']}{s['endpoint']}  model {s['model']}  "
        f"rate {s['request_rate']}/s  max concurrency {s['max_concurrency']}",
        f"completed {s['completed']}/{s['num_prompts']}  failed {s['failed']}  "
        f"in {s['duration_s']:.2f} s",
        f"throughput: {s['request_throughput']:.2f} req/s  "
        f"{s['output_throughput']:.1f} output tok/s  {s['total_token_throughput']:.1f} total tok/s",
    ]
    for name, label in (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2E")):
        parts = [f"mean {s[f'mean_{name}_ms']:.1f}"] + [
            f"p{q} {s[f'p{q}_{name}_ms']:.1f}" for q in PERCENTILES
        ]
        lines.append(f"{label:>5} ms: " + "  ".join(parts))
    for error in s["errors"]:
        lines.append(f"error: {error}")
    return "\n".join(lines)


def main(ns: argparse.Namespace) -> dict[str, Any]:
    if ns.num_prompts < 1:
        raise ValueError(f"--num-prompts must be at least 1, got {ns.num_prompts}")
    if ns.max_concurrency is not None and ns.max_concurrency < 1:
        raise ValueError(f"--max-concurrency must be at least 1, got {ns.max_concurrency}")
    tokenizer = None
    if ns.tokenizer is not None:
        from pagedllm.transformers_utils.tokenizer import get_tokenizer

        tokenizer = get_tokenizer(ns.tokenizer)
        if tokenizer is None:
            raise ValueError(f"no tokenizer at {ns.tokenizer}")
    prompts = build_prompts(
        ns.num_prompts,
        tuple(ns.input_len),
        tuple(ns.output_len),
        ns.max_output_len,
        ns.vocab_size,
        ns.seed,
        tokenizer,
    )
    summary = asyncio.run(run_benchmark(ns, prompts))
    print(json.dumps(summary, indent=2) if ns.json else format_summary(summary))
    sys.stdout.flush()
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(summary, f, indent=2)
    return summary
