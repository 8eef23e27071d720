"""`pagedllm bench startup`: time from a fresh process to the first generated token.

Each run is a new Python process that reports its phases (import pagedllm, `LLM()`, the first
token); the parent adds the whole process's wall time. Three situations:
- `convert`: an empty cache folder, so a GGUF model is converted first (a one-time cost);
- `cold`: the converted cache exists but the OS page cache was dropped (needs root; skipped
  with a note otherwise);
- `warm`: the same start again, files in the page cache.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

CHILD = """
import json, sys, time
t0 = time.perf_counter()
from pagedllm import LLM, SamplingParams
t1 = time.perf_counter()
kwargs = json.loads(sys.argv[1])
llm = LLM(**kwargs)
t2 = time.perf_counter()
llm.generate("The capital of France is", SamplingParams(temperature=0, max_tokens=1), use_tqdm=False)
t3 = time.perf_counter()
print("RESULT" + json.dumps({"import": t1 - t0, "llm_init": t2 - t1, "first_token": t3 - t2}))
"""


def _run_child(kwargs: dict, env: dict[str, str]) -> dict[str, float]:
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(kwargs)],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"start-up run failed:\n{proc.stderr[-3000:]}")
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT"))
    result = json.loads(line[len("RESULT") :])
    result["llm_to_token"] = result["llm_init"] + result["first_token"]
    result["process"] = wall
    return result


def _drop_page_cache() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="default: the default model")
    parser.add_argument("--warm-runs", type=int, default=3)
    parser.add_argument("--kv-cache-memory", default=None)
    parser.add_argument("--max-model-len", type=int, default=None)


def _line(name: str, r: dict[str, float]) -> str:
    return (
        f"{name:>8}: LLM() → first token {r['llm_to_token']:6.2f} s   (import {r['import']:.2f} s, "
        f"LLM() {r['llm_init']:.2f} s, first token {r['first_token']:.2f} s; "
        f"whole process {r['process']:.2f} s)"
    )


def main(ns: argparse.Namespace) -> None:
    kwargs = {"model": ns.model}
    if ns.kv_cache_memory:
        kwargs["kv_cache_memory"] = ns.kv_cache_memory
    if ns.max_model_len:
        kwargs["max_model_len"] = ns.max_model_len
    env = dict(os.environ)
    with tempfile.TemporaryDirectory(prefix="pagedllm-startup-") as cache:
        env["PAGEDLLM_CACHE_DIR"] = cache
        print(_line("convert", _run_child(kwargs, env)), flush=True)
        if _drop_page_cache():
            print(_line("cold", _run_child(kwargs, env)), flush=True)
        else:
            print("    cold: skipped (dropping the page cache needs root)", flush=True)
        warm = [_run_child(kwargs, env) for _ in range(ns.warm_runs)]
        best = min(warm, key=lambda r: r["llm_to_token"])
        print(_line("warm", best) + f"  [best of {len(warm)}]", flush=True)
