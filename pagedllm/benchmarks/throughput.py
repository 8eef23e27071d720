"""`pagedllm bench throughput`: offline throughput on T1 (or a scaled-down T1), for pagedllm and,
in the same run, HF transformers `generate` in static batches, so the ratio is measured."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

from pagedllm.benchmarks.workloads import BenchRequest, t1_requests, t3_requests
from pagedllm.config import EngineConfig
from pagedllm.engine_args import EngineArgs


@dataclass
class ThroughputResult:
    backend: str
    num_requests: int
    elapsed_s: float
    prompt_tokens: int
    output_tokens: int

    @property
    def requests_per_s(self) -> float:
        return self.num_requests / self.elapsed_s

    @property
    def output_tok_per_s(self) -> float:
        return self.output_tokens / self.elapsed_s

    @property
    def total_tok_per_s(self) -> float:
        return (self.prompt_tokens + self.output_tokens) / self.elapsed_s

    def line(self) -> str:
        return (
            f"{self.backend:>9}: {self.requests_per_s:8.2f} req/s  "
            f"{self.output_tok_per_s:10.1f} output tok/s  {self.total_tok_per_s:10.1f} total tok/s  "
            f"({self.num_requests} requests, {self.output_tokens} output tokens, {self.elapsed_s:.1f} s)"
        )


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--backend",
        default="pagedllm",
        help="comma-separated runs, in one process: pagedllm, pagedllm-no-prefix-caching, "
        "pagedllm-mp (the multiprocess executor), pagedllm-fp8-kv (--kv-cache-dtype fp8), "
        "pagedllm-json-schema (every request under "
        "STRUCTURED_SCHEMA), hf",
    )
    parser.add_argument(
        "--workload",
        default="t1",
        choices=["t1", "t3"],
        help="t1: random lengths; t3: shared prefix",
    )
    parser.add_argument("--num-prompts", type=int, default=None, help="default: 256 (t1), 200 (t3)")
    parser.add_argument(
        "--profile-phases",
        action="store_true",
        help="time the engine's step phases over the whole run and print the totals",
    )
    parser.add_argument(
        "--torch-profile",
        action="store_true",
        help="(GPU) run under the torch profiler; print the kernels' GPU time over the whole run",
    )
    parser.add_argument(
        "--ceilings",
        action="store_true",
        help="(GPU) measure copy bandwidth and matmul rate; report the workload's lower bound",
    )
    parser.add_argument(
        "--input-len", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX")
    )
    parser.add_argument(
        "--output-len", type=int, nargs=2, default=[100, 1024], metavar=("MIN", "MAX")
    )
    parser.add_argument("--workload-seed", type=int, default=0, help="lengths; prompt ids use +1")
    parser.add_argument("--temperature", type=float, default=0.6)
    parser.add_argument("--hf-batch-size", type=int, default=64)
    parser.add_argument(
        "--hf-num-prompts",
        type=int,
        default=None,
        help="run hf on this many of the requests (every k-th by prompt length, so the lengths "
        "keep their spread), for baselines too slow for the whole workload; default: all",
    )
    parser.add_argument("--output-json", default=None, help="write the results here")
    EngineArgs.add_cli_args(parser)


# The JSON schema of `--backend pagedllm-json-schema`: an array of strings that cannot close
# before max_tokens (each item takes at least 3 tokens: outputs of up to 6,000 tokens stay open),
# so constrained outputs are as long as unconstrained ones and the two runs do the same work.
STRUCTURED_SCHEMA = {"type": "array", "items": {"type": "string"}, "minItems": 2000}


def with_tokenizer(args: EngineArgs) -> EngineArgs:
    """`args` with a tokenizer: a dummy-weight config ships none, and structured output needs
    one: a synthetic vocabulary of the model's size (benchmarks/synthetic_tokenizer.py)."""
    config = args.create_engine_config()
    if config.model_config.tokenizer is not None and not args.skip_tokenizer_init:
        from pagedllm.transformers_utils.tokenizer import get_tokenizer

        if get_tokenizer(config.model_config.tokenizer) is not None:
            return args
    import tempfile

    from pagedllm.benchmarks.synthetic_tokenizer import write_synthetic_tokenizer

    mc = config.model_config
    folder = write_synthetic_tokenizer(
        tempfile.mkdtemp(prefix="pagedllm-tokenizer-"), mc.vocab_size, mc.eos_token_ids[0]
    )
    print(f"structured output: a synthetic {mc.vocab_size}-token vocabulary at {folder}")
    return dataclasses.replace(args, tokenizer=str(folder), skip_tokenizer_init=False)


def run_pagedllm(
    args: EngineArgs,
    requests: list[BenchRequest],
    temperature: float,
    name: str = "pagedllm",
    profile_phases: bool = False,
    torch_profile: bool = False,
    structured: bool = False,
) -> ThroughputResult:
    from pagedllm import LLM, SamplingParams, StructuredOutputsParams

    llm = LLM(**vars(args))
    phases = None
    if profile_phases:
        from pagedllm.benchmarks.profile_step import time_phases

        phases = time_phases(llm.llm_engine)
    prompts = [{"prompt_token_ids": r.prompt_token_ids} for r in requests]
    spec = StructuredOutputsParams(json=STRUCTURED_SCHEMA) if structured else None
    params = [
        SamplingParams(
            temperature=temperature,
            max_tokens=r.output_len,
            ignore_eos=True,
            structured_outputs=spec,
        )
        for r in requests
    ]
    if structured:
        # NOTE: the grammar backend is made (the vocabulary read) and the schema compiled on the
        # first constrained request: once per engine, like the CUDA graphs, so out of the timing.
        llm.generate([prompts[0]], dataclasses.replace(params[0], max_tokens=2), use_tqdm=False)
    with _kernel_profile(torch_profile):
        start = time.perf_counter()
        outputs = llm.generate(prompts, params, use_tqdm=True)
        elapsed = time.perf_counter() - start
    if phases is not None:
        from pagedllm.benchmarks.profile_step import print_phases

        print(f"{name}: phases over the whole run ({elapsed:.2f} s):")
        print_phases(phases)
    if args.speculative_config is not None:
        from pagedllm.benchmarks.spec_decode import spec_decode_line

        print(f"{name}: {spec_decode_line(llm.llm_engine.get_stats())}")
    llm.llm_engine.engine_core.shutdown()
    del llm
    _free_device_memory()
    return ThroughputResult(
        name,
        len(requests),
        elapsed,
        sum(len(r.prompt_token_ids) for r in requests),
        sum(len(o.outputs[0].token_ids) for o in outputs),
    )


def run_hf(
    config: EngineConfig, requests: list[BenchRequest], temperature: float, batch_size: int
) -> ThroughputResult:
    """HF `generate` in static batches sorted by prompt length; each batch runs to its longest
    output, and only the tokens each request asked for count."""
    import torch

    from pagedllm.benchmarks.hf_model import load_hf_model

    model, device = load_hf_model(config)
    order = sorted(requests, key=lambda r: len(r.prompt_token_ids))
    start = time.perf_counter()
    with torch.inference_mode():
        for lo in range(0, len(order), batch_size):
            batch = order[lo : lo + batch_size]
            width = max(len(r.prompt_token_ids) for r in batch)
            ids = torch.zeros(len(batch), width, dtype=torch.long)
            mask = torch.zeros(len(batch), width, dtype=torch.long)
            for i, r in enumerate(batch):  # left padding
                ids[i, width - len(r.prompt_token_ids) :] = torch.tensor(r.prompt_token_ids)
                mask[i, width - len(r.prompt_token_ids) :] = 1
            new = max(r.output_len for r in batch)
            model.generate(
                ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=new,
                min_new_tokens=new,
                do_sample=temperature > 0,
                temperature=temperature if temperature > 0 else None,
                top_k=None,
                top_p=None,
                pad_token_id=0,
            )
    if device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return ThroughputResult(
        "hf",
        len(requests),
        elapsed,
        sum(len(r.prompt_token_ids) for r in requests),
        sum(r.output_len for r in requests),
    )


def hf_subset(requests: list[BenchRequest], count: int | None) -> list[BenchRequest]:
    """`count` of the requests spread evenly over their prompt-length order (all for None)."""
    if count is None or count >= len(requests):
        return requests
    if count < 1:
        raise ValueError(f"hf_num_prompts must be at least 1, got {count}")
    order = sorted(requests, key=lambda r: len(r.prompt_token_ids))
    return [order[i * len(order) // count] for i in range(count)]


def main(ns: argparse.Namespace) -> list[ThroughputResult]:
    engine_args = EngineArgs.from_cli_args(ns)
    config = engine_args.create_engine_config()
    vocab = config.model_config.vocab_size
    if ns.workload == "t3":
        requests = t3_requests(ns.num_prompts or 200, vocab_size=vocab, seed=ns.workload_seed)
    else:
        requests = t1_requests(
            ns.num_prompts or 256,
            tuple(ns.input_len),
            tuple(ns.output_len),
            vocab,
            ns.workload_seed,
        )
    results = []
    for backend in ns.backend.split(","):
        if backend == "pagedllm":
            results.append(
                run_pagedllm(
                    engine_args,
                    requests,
                    ns.temperature,
                    profile_phases=ns.profile_phases,
                    torch_profile=ns.torch_profile,
                )
            )
        elif backend == "pagedllm-no-prefix-caching":
            no_cache = dataclasses.replace(engine_args, enable_prefix_caching=False)
            results.append(run_pagedllm(no_cache, requests, ns.temperature, backend))
        elif backend == "pagedllm-mp":
            mp_args = dataclasses.replace(engine_args, distributed_executor_backend="mp")
            results.append(run_pagedllm(mp_args, requests, ns.temperature, backend))
        elif backend == "pagedllm-fp8-kv":
            fp8_kv = dataclasses.replace(engine_args, kv_cache_dtype="fp8")
            results.append(run_pagedllm(fp8_kv, requests, ns.temperature, backend))
        elif backend == "pagedllm-json-schema":
            results.append(
                run_pagedllm(
                    with_tokenizer(engine_args),
                    requests,
                    ns.temperature,
                    backend,
                    profile_phases=ns.profile_phases,
                    structured=True,
                )
            )
        elif backend == "hf":
            results.append(
                run_hf(
                    config, hf_subset(requests, ns.hf_num_prompts), ns.temperature, ns.hf_batch_size
                )
            )
        else:
            raise ValueError(
                f"unknown backend {backend!r}: use pagedllm, pagedllm-no-prefix-caching, "
                "pagedllm-mp, pagedllm-fp8-kv, pagedllm-json-schema or hf"
            )
    print(
        f"model {config.model_config.model} ({config.model_config.dtype}, "
        f"{config.device_config.device}), {len(requests)} requests"
    )
    for r in results:
        print(r.line())
    for other in results[1:]:
        ratio = results[0].output_tok_per_s / other.output_tok_per_s
        print(f"ratio {results[0].backend}/{other.backend} (output tok/s): {ratio:.2f}x")
    if ns.ceilings and config.device_config.device == "cuda":
        from pagedllm.benchmarks.ceilings import lower_bound_s, measure_ceilings

        ceilings = measure_ceilings()
        bound = sum(r.output_len for r in requests) / lower_bound_s(
            config.model_config, requests, ceilings
        )
        print(ceilings.line())
        print(
            f"lower bound {bound:,.0f} output tok/s; {results[0].backend} reached "
            f"{results[0].output_tok_per_s / bound:.2f} of it"
        )
    if ns.output_json:
        with open(ns.output_json, "w") as f:
            json.dump(
                [
                    {
                        "backend": r.backend,
                        "requests_per_s": r.requests_per_s,
                        "output_tok_per_s": r.output_tok_per_s,
                        "total_tok_per_s": r.total_tok_per_s,
                        "elapsed_s": r.elapsed_s,
                        "output_tokens": r.output_tokens,
                    }
                    for r in results
                ],
                f,
                indent=2,
            )
    return results


@contextlib.contextmanager
def _kernel_profile(enabled: bool) -> Iterator[None]:
    """Under `enabled` (and CUDA), profiles the GPU's kernels and prints their time: where a
    GPU-bound run's time goes (the profiler's overhead makes the run itself slower)."""
    import torch

    if not (enabled and torch.cuda.is_available()):
        yield
        return
    from torch.profiler import ProfilerActivity, profile

    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        yield
        torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) * 1e3
    averages = prof.key_averages()
    kernel_ms = averages.total_average().self_device_time_total / 1e3
    print(f"torch profile: {kernel_ms:.0f} ms of kernels in {wall_ms:.0f} ms (profiled run)")
    print(averages.table(sort_by="self_cuda_time_total", row_limit=25, max_name_column_width=70))


def _free_device_memory() -> None:
    """Lets the next run of the same process have the GPU memory back."""
    import gc

    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
