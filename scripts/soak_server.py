"""Soak a running `pagedllm serve`: many mixed requests (good ones of random lengths, streamed or
not, some hung up mid-stream, and hostile ones), the API server's and the engine core's memory
sampled as they go. Prints the status counts and the RSS curve; exits 1 on a 5xx, a hang, or KV
blocks left in use at the end.

    python scripts/soak_server.py --base-url http://127.0.0.1:8000 --requests 3000 [--api-key K]

The server's PID is found from its port (Linux /proc); the engine core is its spawned child.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

try:
    import httpx2 as httpx
except ImportError:  # pragma: no cover
    import httpx  # type: ignore[no-redef]

HOSTILE = [
    {"top_k": 2**63},
    {"seed": 2**64},
    {"temperature": float("nan")},
    {"stop": ["\udfff"]},
    {"prompt": "\ud800"},
    {"n": 10_000},
    {"max_tokens": 10**9},
    {"logit_bias": {"5": 1e400}},
    {"stop": [f"s{i}" for i in range(500)]},
]


def _pid_listening(port: int) -> int:
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if int(fields[1].split(":")[1], 16) == port and fields[3] == "0A":  # LISTEN
            inodes.add(fields[9])
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            for fd in (proc / "fd").iterdir():
                if fd.readlink().name.removeprefix("socket:[").rstrip("]") in inodes:
                    return int(proc.name)
        except (PermissionError, FileNotFoundError, OSError):
            continue
    raise SystemExit(f"no process listens on port {port}")


def _core_pid(server_pid: int) -> int:
    for pid in Path(f"/proc/{server_pid}/task/{server_pid}/children").read_text().split():
        if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes():
            return int(pid)
    raise SystemExit("no engine-core child")


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _one(client, model: str, rng: random.Random) -> str:
    base = {"model": model, "max_tokens": rng.randint(1, 24), "ignore_eos": True}
    kind = rng.random()
    if kind < 0.25:
        body = {**base, "prompt": "x", **rng.choice(HOSTILE)}
        data = json.dumps(body, allow_nan=True)
        r = client.post(
            "/v1/completions", content=data, headers={"Content-Type": "application/json"}
        )
        return str(r.status_code)
    prompt = [rng.randrange(3, 400) for _ in range(rng.randint(1, 300))]
    if kind < 0.6:
        return str(client.post("/v1/completions", json={**base, "prompt": prompt}).status_code)
    body = {**base, "prompt": prompt, "stream": True, "max_tokens": rng.randint(8, 48)}
    with client.stream("POST", "/v1/completions", json=body) as r:
        for i, _ in enumerate(r.iter_lines()):
            if kind > 0.85 and i > 4:
                return "hung-up"  # the client goes away mid-stream
        return str(r.status_code)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:8000")
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--samples", type=int, default=6, help="RSS samples along the run")
    args = parser.parse_args()
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    port = int(args.base_url.rsplit(":", 1)[1].split("/")[0])
    server = _pid_listening(port)
    core = _core_pid(server)
    client = httpx.Client(base_url=args.base_url, headers=headers, timeout=120)
    model = client.get("/v1/models").json()["data"][0]["id"]
    counts: Counter[str] = Counter()
    curve = [(0, _rss_mib(server), _rss_mib(core))]
    per_sample = max(1, args.requests // args.samples)
    started = time.monotonic()
    rng = random.Random(0)
    with ThreadPoolExecutor(args.concurrency) as pool:
        for done in range(0, args.requests, per_sample):
            seeds = [rng.random() for _ in range(min(per_sample, args.requests - done))]
            clients = [httpx.Client(base_url=args.base_url, headers=headers, timeout=120)]
            jobs = [pool.submit(_one, clients[0], model, random.Random(s)) for s in seeds]
            for job in jobs:
                counts[job.result()] += 1
            curve.append((done + len(seeds), _rss_mib(server), _rss_mib(core)))
    elapsed = time.monotonic() - started
    deadline = time.monotonic() + 60
    while True:
        metrics = client.get("/metrics").text
        busy = [
            line
            for line in metrics.splitlines()
            if line.startswith(("pagedllm:num_requests_running", "pagedllm:kv_cache_usage_perc"))
            and float(line.rsplit(" ", 1)[1]) != 0
        ]
        if not busy or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print(f"{args.requests} requests in {elapsed:.0f} s: {dict(sorted(counts.items()))}")
    print("requests  api-server RSS (MiB)  engine-core RSS (MiB)")
    for n, api, eng in curve:
        print(f"{n:8d}  {api:20.1f}  {eng:21.1f}")
    failed = sum(v for k, v in counts.items() if k.startswith("5"))
    if failed or busy:
        print(f"FAILED: {failed} 5xx, still busy: {busy}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
