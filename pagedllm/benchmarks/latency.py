"""`pagedllm bench latency` (T2): one request at a time, 128 prompt tokens, 256 greedy output
tokens: time to first token, and decode tokens/s after it.

On a GPU the same run measures the copy bandwidth and reports the batch-1 bound (every decode
step reads the weights once: bound = copy bandwidth / weight bytes) and the fraction reached.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

from pagedllm.benchmarks.workloads import t1_requests
from pagedllm.engine_args import EngineArgs


def add_cli_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--input-len", type=int, default=128)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--num-iters", type=int, default=3, help="timed requests (median)")
    parser.add_argument("--num-warmup", type=int, default=1)
    EngineArgs.add_cli_args(parser)


def main(ns: argparse.Namespace) -> dict[str, float]:
    from pagedllm.engine.llm_engine import LLMEngine
    from pagedllm.sampling_params import RequestOutputKind, SamplingParams

    engine = LLMEngine.from_engine_args(EngineArgs.from_cli_args(ns))
    mc = engine.config.model_config
    params = SamplingParams(
        temperature=0,
        max_tokens=ns.output_len,
        ignore_eos=True,
        output_kind=RequestOutputKind.DELTA,
    )
    ttfts, rates = [], []
    before = None
    for i in range(ns.num_warmup + ns.num_iters):
        if i == ns.num_warmup:
            before = dataclasses.replace(engine.get_stats())
        (req,) = t1_requests(1, (ns.input_len,) * 2, (ns.output_len,) * 2, mc.vocab_size, i)
        start = time.perf_counter()
        engine.add_request(str(i), {"prompt_token_ids": req.prompt_token_ids}, params)
        first = None
        while engine.has_unfinished_requests():
            if engine.step() and first is None:
                first = time.perf_counter()
        end = time.perf_counter()
        assert first is not None
        if i >= ns.num_warmup:
            ttfts.append(first - start)
            rates.append((ns.output_len - 1) / (end - first))
    result = {"ttft_s": statistics.median(ttfts), "decode_tok_per_s": statistics.median(rates)}
    print(
        f"model {mc.model} ({mc.dtype}, {engine.config.device_config.device}): "
        f"{ns.input_len} prompt + {ns.output_len} output tokens, batch 1"
    )
    print(
        f"TTFT {result['ttft_s'] * 1e3:.1f} ms, decode {result['decode_tok_per_s']:.1f} tok/s "
        f"(median of {ns.num_iters})"
    )
    if engine.config.speculative_config is not None:
        from pagedllm.benchmarks.spec_decode import spec_decode_line

        print(spec_decode_line(engine.get_stats(), before))
    if engine.config.device_config.device == "cuda":
        from pagedllm.benchmarks.ceilings import measure_ceilings, weight_bytes

        ceilings = measure_ceilings()
        bound = ceilings.copy_bytes_per_s / weight_bytes(mc)
        result["bound_tok_per_s"] = bound
        print(ceilings.line())
        print(
            f"batch-1 bound {bound:.0f} tok/s (weights {weight_bytes(mc) / 1e9:.2f} GB per step): "
            f"reached {result['decode_tok_per_s'] / bound:.2f}"
        )
    return result
