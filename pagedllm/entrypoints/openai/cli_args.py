"""`pagedllm serve` flags: the server's own (vLLM's names) and every engine flag (EngineArgs).

Kept light (argparse only) because the `pagedllm` command builds every subcommand's parser.
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from pagedllm.engine_args import EngineArgs

API_KEY_ENV = "PAGEDLLM_API_KEY"


def add_serve_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "model_tag",
        nargs="?",
        default=None,
        metavar="MODEL",
        help="the model to serve, like --model (default: SmolLM2-135M-Instruct)",
    )
    parser.add_argument("--host", default="0.0.0.0", help="address to listen on")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"require 'Authorization: Bearer KEY' (default: ${API_KEY_ENV}, else none)",
    )
    parser.add_argument(
        "--served-model-name",
        nargs="+",
        default=None,
        help="the name(s) clients use as `model` (default: MODEL as given); the first is reported",
    )
    parser.add_argument(
        "--chat-template", default=None, help="a Jinja chat template (file or text)"
    )
    parser.add_argument(
        "--default-max-tokens",
        "--max-tokens-default",
        type=int,
        default=None,
        help="max_tokens for a request that omits it (default: the model's generation config's "
        "max_new_tokens, else all the room the context leaves, as vLLM)",
    )
    parser.add_argument(
        "--uvicorn-log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "trace"],
    )
    parser.add_argument(
        "--disable-uvicorn-access-log", action="store_true", help="no line per HTTP request"
    )
    EngineArgs.add_cli_args(parser)


def engine_args_from_cli(ns: argparse.Namespace) -> EngineArgs:
    if ns.model_tag is not None and ns.model is not None and ns.model_tag != ns.model:
        raise ValueError(f"MODEL ({ns.model_tag}) and --model ({ns.model}) disagree")
    ns.model = ns.model_tag or ns.model
    return EngineArgs.from_cli_args(ns)


def read_chat_template(value: str | None) -> str | None:
    """A template file's text, or the value itself when it is a template."""
    from pagedllm.entrypoints.interactive import _read_template

    text = _read_template(value)
    if text is not None and text == value and "{{" not in text and "{%" not in text:
        raise ValueError(f"--chat-template {value!r} is neither a file nor a Jinja template")
    return text


def serving_config_from_cli(
    ns: argparse.Namespace, engine_args: EngineArgs, model_path: str | None = None
) -> Any:
    from pagedllm.entrypoints.openai.serving_engine import ServingConfig
    from pagedllm.models.default import DEFAULT_MODEL

    tag = engine_args.model or DEFAULT_MODEL
    return ServingConfig(
        served_model_names=tuple(ns.served_model_name or [tag]),
        model_path=model_path or tag,
        chat_template=read_chat_template(ns.chat_template),
        max_logprobs=engine_args.max_logprobs,
        default_max_tokens=_positive(ns.default_max_tokens, "--default-max-tokens"),
    )


def _positive(value: int | None, flag: str) -> int | None:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be at least 1, got {value}")
    return value
