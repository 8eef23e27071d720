"""The `pagedllm` command: `pagedllm bench throughput …` (more subcommands join here)."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description="pagedllm: fast LLM inference")
    sub = parser.add_subparsers(dest="command", required=True)

    bench = sub.add_parser("bench", help="benchmarks of shared/BENCHMARKS.md")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from pagedllm.benchmarks import throughput

    tp = bench_sub.add_parser("throughput", help="T1: offline throughput (optionally vs HF)")
    throughput.add_cli_args(tp)
    tp.set_defaults(func=throughput.main)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    ns = build_parser().parse_args(argv)
    try:
        ns.func(ns)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
