"""Does xgrammar's batch bitmask fill overlap the caller's Python work when run in a thread?

    python scripts/bitmask_overlap.py ROWS [THREADS]

Builds the T1 structured-output bench's kind of grammar (an array of strings) over the synthetic
151,936-token vocabulary, puts ROWS matchers inside a string, then for several interpreter
switch intervals: starts the fill in a thread, keeps the caller busy in Python for 1 or 3 ms,
and prints how long the caller still waits for the fill after that. No overlap: the wait is the
whole fill (the engine's `StructuredOutputManager._fill` shortens the interval for this).
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

import xgrammar as xgr
from transformers import AutoTokenizer

from pagedllm.benchmarks.synthetic_tokenizer import write_synthetic_tokenizer

VOCAB, EOS = 151936, 151643
SCHEMA = {
    "type": "object",
    "properties": {"items": {"type": "array", "items": {"type": "string"}}},
    "required": ["items"],
}


def busy(ms: float) -> None:
    end = time.perf_counter() + ms / 1e3
    while time.perf_counter() < end:
        pass


def main() -> None:
    rows = int(sys.argv[1])
    threads = int(sys.argv[2]) if len(sys.argv) > 2 else 8
    tok = AutoTokenizer.from_pretrained(write_synthetic_tokenizer(tempfile.mkdtemp(), VOCAB, EOS))
    info = xgr.TokenizerInfo.from_huggingface(tok, vocab_size=VOCAB)
    grammar = xgr.GrammarCompiler(info, max_threads=2).compile_json_schema(json.dumps(SCHEMA))
    matchers = [xgr.GrammarMatcher(grammar) for _ in range(rows)]
    prefix = tok.encode('{"items": ["abc', add_special_tokens=False)
    for m in matchers:
        for t in prefix:
            m.accept_token(t)
    bitmask = xgr.allocate_token_bitmask(rows, info.vocab_size).numpy()
    batch = xgr.BatchGrammarMatcher(threads)
    pool = ThreadPoolExecutor(1)
    alone = []
    for _ in range(13):
        t = time.perf_counter()
        batch.batch_fill_next_token_bitmask(matchers, bitmask)
        alone.append(time.perf_counter() - t)
    print(f"{rows} rows, {threads} threads: fill alone {statistics.median(alone[3:]) * 1e3:.2f} ms")
    for interval in (0.005, 0.0005, 0.0001):
        sys.setswitchinterval(interval)
        for work_ms in (1.0, 3.0):
            waits = []
            for _ in range(20):
                future = pool.submit(batch.batch_fill_next_token_bitmask, matchers, bitmask)
                busy(work_ms)
                t = time.perf_counter()
                future.result()
                waits.append(time.perf_counter() - t)
            print(
                f"  switch interval {interval * 1e3:.1f} ms, caller busy {work_ms} ms: then waits "
                f"{statistics.median(waits) * 1e3:.2f} ms (median), {max(waits) * 1e3:.2f} max"
            )


if __name__ == "__main__":
    main()
