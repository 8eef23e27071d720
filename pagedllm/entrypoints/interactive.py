"""`pagedllm generate` and `pagedllm chat`: streaming text to the terminal from the offline engine.

Owns their flags (sampling and engine), the chat loop and its slash commands (`ChatSession`).
"""

from __future__ import annotations

import argparse
import itertools
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from pagedllm.engine_args import EngineArgs
from pagedllm.sampling_params import RequestOutputKind, SamplingParams

EXIT_COMMANDS = ("/exit", "/quit")
# The chat's commands: lines that start with "/" are never sent to the model.
CHAT_COMMANDS: dict[str, str] = {
    "/help": "list these commands",
    "/reset": "clear the conversation (the --system message stays)",
    "/exit": "end the chat (as does Ctrl-D)",
    "/quit": "end the chat",
}


# NOTE: the sampling flags default to None: the model's generation config then decides (the
# default model's: temperature 0.2, top_p 0.9), else SamplingParams' own default.
_FROM_CONFIG = " (default: the model's generation config, else {})"


# (flag, type, what it does, SamplingParams' own default) of the flags the config may set.
_CONFIG_FLAGS = (
    ("--temperature", float, "sampling temperature; 0 always picks the most likely token", 1.0),
    (
        "--top-p",
        float,
        "sample from the likeliest tokens whose probabilities add up to P",
        "1: off",
    ),
    ("--top-k", int, "sample from the K most likely tokens", "0: off"),
    ("--min-p", float, "drop tokens less likely than MIN_P times the most likely one", "0: off"),
    ("--repetition-penalty", float, "above 1, discourage tokens already seen", "1: off"),
)


def add_sampling_args(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    parser.add_argument(
        "--max-tokens",
        type=int,
        default=None,
        help="most tokens to generate per reply" + _FROM_CONFIG.format(max_tokens),
    )
    parser.set_defaults(fallback_max_tokens=max_tokens)
    for flag, kind, what, default in _CONFIG_FLAGS:
        parser.add_argument(flag, type=kind, default=None, help=what + _FROM_CONFIG.format(default))
    parser.add_argument(
        "--sampling-seed",
        type=int,
        default=None,
        help="per-request sampling seed, for a reproducible reply (default: none)",
    )
    parser.add_argument(
        "--stop",
        action="append",
        default=None,
        help="end the reply at this string, which is not printed (repeatable)",
    )


_SAMPLING_FLAGS = ("max_tokens", "temperature", "top_p", "top_k", "min_p", "repetition_penalty")


def sampling_params_from_args(
    ns: argparse.Namespace, defaults: dict[str, Any] | None = None
) -> SamplingParams:
    """The flags given, over `defaults` (the model's generation config; None before the model
    is loaded: then only the flags are checked, so a bad one fails before the model loads)."""
    given = {name: getattr(ns, name) for name in _SAMPLING_FLAGS}
    kwargs = {**(defaults or {}), **{k: v for k, v in given.items() if v is not None}}
    kwargs.setdefault("max_tokens", ns.fallback_max_tokens)
    return SamplingParams(**kwargs, seed=ns.sampling_seed, stop=ns.stop)


def _sampling_params(ns: argparse.Namespace, llm: Any) -> SamplingParams:
    return sampling_params_from_args(ns, llm.llm_engine.config.model_config.sampling_defaults)


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
    sampling_params_from_args(ns)  # bad flags fail before the model loads
    llm = _load_llm(ns)
    params = _sampling_params(ns, llm)
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


@dataclass
class ChatSession:
    """The conversation of `pagedllm chat` and its slash commands (no model needed)."""

    system: str | None = None
    messages: list[dict[str, str]] = field(default_factory=list, init=False)
    finished: bool = field(default=False, init=False)

    def __post_init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        """Clears the conversation in place, keeping the system message."""
        self.messages[:] = [{"role": "system", "content": self.system}] if self.system else []

    def handle_command(self, text: str) -> str | None:
        """Runs `text` if it is a command (it starts with "/") and returns what to print ("" for
        nothing); None when it is a message for the model. `/exit` and `/quit` set `finished`."""
        if not text.startswith("/"):
            return None
        command = text.split()[0].lower()
        if command == "/help":
            return "\n".join(f"{name:<8}{what}" for name, what in CHAT_COMMANDS.items())
        if command == "/reset":
            self.reset()
            kept = " (the system message stays)" if self.system else ""
            return f"conversation cleared{kept}"
        if command in EXIT_COMMANDS:
            self.finished = True
            return ""
        return f"unknown command {text.split()[0]}; /help lists them"


def run_chat(ns: argparse.Namespace) -> None:
    sampling_params_from_args(ns)  # bad flags fail before the model loads
    template = _read_template(ns.chat_template)
    llm = _load_llm(ns)
    params = _sampling_params(ns, llm)
    session = ChatSession(system=ns.system or None)
    messages = session.messages
    print(
        f"Chat with the model; /help lists the commands, {' or '.join(EXIT_COMMANDS)} "
        "(or Ctrl-D) ends.",
        flush=True,
    )
    while not session.finished:
        try:
            line = input("> ")
        except EOFError:
            print()
            return
        text = line.strip()
        if not text:
            continue
        reply_to_command = session.handle_command(text)
        if reply_to_command is not None:
            if reply_to_command:
                print(reply_to_command, flush=True)
            continue
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
