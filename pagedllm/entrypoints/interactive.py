"""`pagedllm generate` and `pagedllm chat`: streaming text to the terminal from the offline engine."""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from typing import Any

from pagedllm.engine_args import EngineArgs
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

EXIT_COMMANDS = ("/exit", "/quit")


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument("--max-tokens", type=int, default=max_tokens)
    parser.add_argument("--temperature", type=float, default=0.7)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--min-p", type=float, default=0.0)
    parser.add_argument("--repetition-penalty", type=float, default=1.0)
    parser.add_argument("--sampling-seed", type=int, default=None, help="per-request sampling seed")
    parser.add_argument("--stop", action="append", default=None, help="a stop string (repeatable)")


def sampling_params_from_args(ns: argparse.Namespace) -> SamplingParams:
    return SamplingParams(
        max_tokens=ns.max_tokens,
        temperature=ns.temperature,
        top_p=ns.top_p,
        top_k=ns.top_k,
        min_p=ns.min_p,
        repetition_penalty=ns.repetition_penalty,
        seed=ns.sampling_seed,
        stop=ns.stop,
    )


def add_generate_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("prompt", help="the text to continue")
    add_sampling_args(parser, max_tokens=256)
    EngineArgs.add_cli_args(parser)


def add_chat_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--system", default=None, help="a system message")
    parser.add_argument(
        "--chat-template", default=None, help="a Jinja chat template (file or text)"
    )
    add_sampling_args(parser, max_tokens=512)
    EngineArgs.add_cli_args(parser)


_ids = itertools.count()


def stream_text(llm: Any, prompt: Any, params: SamplingParams) -> Iterator[str]:
    """The request's text as it is generated, piece by piece."""
    engine = llm.llm_engine
    request_id = f"cli-{next(_ids)}"
    engine.add_request(request_id, prompt, params, output_kind=RequestOutputKind.DELTA)
    try:
        finished = False
        while not finished:
            for out in engine.step():
                if out.request_id == request_id:
                    finished = out.finished
                    if out.outputs[0].text:
                        yield out.outputs[0].text
    finally:
        if not finished:
            engine.abort_request([request_id])


def _load_llm(ns: argparse.Namespace) -> Any:
    from pagedllm.llm import LLM

    args = EngineArgs.from_cli_args(ns)
    return LLM(**vars(args))


def run_generate(ns: argparse.Namespace) -> None:
    params = sampling_params_from_args(ns)
    llm = _load_llm(ns)
    for piece in stream_text(llm, ns.prompt, params):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _read_template(value: str | None) -> str | None:
    if value is None:
        return None
    from pathlib import Path

    path = Path(value)
    return path.read_text() if path.is_file() else value


def run_chat(ns: argparse.Namespace) -> None:
    params = sampling_params_from_args(ns)
    template = _read_template(ns.chat_template)
    llm = _load_llm(ns)
    messages: list[dict[str, str]] = []
    if ns.system:
        messages.append({"role": "system", "content": ns.system})
    print(f"Chat with the model; {' or '.join(EXIT_COMMANDS)} (or Ctrl-D) ends.", flush=True)
    while True:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            return
        messages.append({"role": "user", "content": text})
        prompt = llm.render_chat(messages, chat_template=template)
        reply = []
        try:
            for piece in stream_text(llm, prompt, params):
                reply.append(piece)
                sys.stdout.write(piece)
                sys.stdout.flush()
        except KeyboardInterrupt:
            sys.stdout.write(" [interrupted]")
        sys.stdout.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
