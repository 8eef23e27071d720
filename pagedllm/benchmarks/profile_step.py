"""Profile decode steps: a step's wall time against its GPU kernel time, and the top ops.

    python -m pagedllm.benchmarks.profile_step llama3-8b 1
    python -m pagedllm.benchmarks.profile_step qwen3-0.6b 256

Loads the model shape with random weights, starts `batch` requests of `--prompt-len` tokens, and
profiles `--steps` steps after `--skip` + `--timed` steps (by default 10 decode steps after 25;
`--skip 0 --timed 0 --steps 3` profiles prompt steps). Where wall time ≫ GPU time, the step is bound
by the host (Python, kernel launches), not by the device.
"""

from __future__ import annotations

import argparse
import time
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from pagedllm import LLM, SamplingParams


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("model")
    parser.add_argument("batch", type=int)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--rows", type=int, default=15, help="top ops to print")
    parser.add_argument("--skip", type=int, default=5, help="steps before the timed ones")
    parser.add_argument("--timed", type=int, default=20, help="steps timed by phase")
    ns = parser.parse_args()
    llm = LLM(ns.model, load_format="dummy", max_model_len=4096, gpu_memory_utilization=0.5)
    engine = llm.llm_engine
    params = SamplingParams(temperature=ns.temperature, max_tokens=400, ignore_eos=True)
    for i in range(ns.batch):
        prompt = [(i * 7 + j) % 30000 for j in range(ns.prompt_len)]
        engine.add_request(str(i), {"prompt_token_ids": prompt}, params)
    for _ in range(ns.skip):
        engine.step()
    cuda = torch.cuda.is_available()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    sync()
    phases = time_phases(engine)
    start = time.perf_counter()
    for _ in range(ns.timed):
        engine.step()
    sync()
    wall = (time.perf_counter() - start) / max(ns.timed, 1)
    print("phases per step:")
    print_phases(phases, max(ns.timed, 1))
    phases.clear()
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(ns.steps):
            engine.step()
        sync()
    averages = prof.key_averages()
    device_ms = averages.total_average().self_device_time_total / ns.steps / 1e3
    print(
        f"{ns.model} batch {ns.batch}: step wall {wall * 1e3:.2f} ms, "
        f"device kernel time {device_ms:.2f} ms/step, decode {ns.batch / wall:.0f} tok/s"
    )
    sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
    print(averages.table(sort_by=sort, row_limit=ns.rows, max_name_column_width=60))


def time_phases(engine: object) -> dict[str, float]:
    """Wraps the step's phases with timers; returns the dict they add seconds to. The model
    runner's step is split by kind: decode-only steps and steps with prompt tokens."""
    phases: dict[str, float] = defaultdict(float)
    core = engine.engine_core  # type: ignore[attr-defined]
    runner = core.executor.worker.model_runner
    targets = [
        (engine, "step", "engine step (all of it)"),
        (core.scheduler, "schedule", "schedule"),
        (runner, "_prepare_inputs", "  prepare inputs"),
        (runner.input_batch, "make_sampling_metadata", "  sampling metadata"),
        (core.scheduler, "update_from_output", "scheduler update"),
        (engine.output_processor, "process_outputs", "output processing"),  # type: ignore[attr-defined]
        (core.structured_output, "grammar_bitmask", "grammar bitmask (host fill)"),
        (core.executor, "sample_tokens", "grammar steps' sampling (queue)"),
    ]
    for obj, attr, name in targets:
        fn = getattr(obj, attr)

        def timed(*args: object, _fn=fn, _name=name, **kwargs: object) -> object:
            t = time.perf_counter()
            result = _fn(*args, **kwargs)
            phases[_name] += time.perf_counter() - t
            return result

        setattr(obj, attr, timed)
    launch, collect = core.executor.launch_model, core.executor.collect_output

    def kind_of(out: object) -> str:
        counts = out.num_scheduled_tokens.values()  # type: ignore[attr-defined]
        return "decode-only" if all(n == 1 for n in counts) else "with prompt tokens"

    kinds: dict[int, str] = {}  # id of a launched step's handle → its kind
    # (bucket, event before the step's first device op, event after its last), on CUDA: the
    # gap between one step's end and the next one's begin is time the GPU waited for the host.
    events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
    phases_events[id(phases)] = events

    def timed_launch(out: object) -> object:
        begin = _record_event()
        t = time.perf_counter()
        handle = launch(out)
        phases[f"launch, {kind_of(out)} (prepare + queue kernels)"] += time.perf_counter() - t
        phases[f"steps {kind_of(out)} (count)"] += 1
        kinds[id(handle)] = kind_of(out)
        if begin is not None:
            events.append((_bucket(out), begin, _record_event()))
        return handle

    def timed_collect(handle: object) -> object:
        kind = kinds.pop(id(handle), "launched before timing")
        t = time.perf_counter()
        result = collect(handle)
        phases[f"collect, {kind} (waits for the GPU)"] += time.perf_counter() - t
        return result

    core.executor.launch_model = timed_launch
    core.executor.collect_output = timed_collect
    return phases


# id of a `time_phases` dict → its step events (read by `print_phases`)
phases_events: dict[int, list[tuple[str, torch.cuda.Event, torch.cuda.Event]]] = {}


def _record_event() -> torch.cuda.Event | None:
    if not torch.cuda.is_available():
        return None
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


def _bucket(out: object) -> str:
    counts = list(out.num_scheduled_tokens.values())  # type: ignore[attr-defined]
    if any(n != 1 for n in counts):
        return "with prompt tokens"
    n = len(counts)
    for lo, hi in ((1, 16), (17, 64), (65, 128), (129, 192)):
        if n <= hi:
            return f"decode {lo:>3}-{hi:<3} rows"
    return "decode 193+    rows"


def print_phases(phases: dict[str, float], per: int = 1) -> None:
    for name, total in sorted(phases.items()):
        if name.endswith("(count)"):
            print(f"  {name:<52} {int(total):>9}")
        else:
            print(f"  {name:<52} {total / per * 1e3:9.2f} ms")
    events = phases_events.get(id(phases))
    if not events:
        return
    torch.cuda.synchronize()
    # bucket → [steps, GPU span of its steps, GPU idle before its steps] (ms)
    rows: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for k, (bucket, begin, end) in enumerate(events):
        row = rows[bucket]
        row[0] += 1
        row[1] += begin.elapsed_time(end)
        if k > 0:
            row[2] += max(0.0, events[k - 1][2].elapsed_time(begin))
    print("  GPU per step kind (span: first to last op of the step; idle: waiting for the host")
    print("  before the step began):")
    for bucket, (n, span, idle) in sorted(rows.items()):
        print(
            f"    {bucket:<22} {int(n):>5} steps  span {span / per:9.1f} ms  "
            f"idle {idle / per:8.1f} ms"
        )
    events.clear()


if __name__ == "__main__":
    main()
