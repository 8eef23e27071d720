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
        "--max-request-body-bytes",
        type=int,
        default=16 * 2**20,
        help="larger request bodies are refused (400)",
    )
    parser.add_argument(
        "--max-prompts", type=int, default=2048, help="most prompts in one /v1/completions request"
    )
    parser.add_argument(
        "--max-messages", type=int, default=2048, help="most messages in one chat request"
    )
    parser.add_argument(
        "--max-num-waiting",
        type=int,
        default=None,
        help="past this many requests waiting in the engine, new ones get a 503 with Retry-After "
        "(default: 4 x max_num_seqs, at least 1024; -1: no bound)",
    )
    parser.add_argument(
        "--request-timeout",
        type=float,
        default=None,
        help="seconds a request may take (streams included) before it is aborted with a 408 "
        "(default: no limit)",
    )
    parser.add_argument(
        "--trust-request-chat-template",
        action="store_true",
        help="accept a chat_template in requests (Jinja from clients; off: refused with 400)",
    )
    parser.add_argument(
        "--metrics-unauthenticated",
        action="store_true",
        help="with --api-key, leave /metrics open to scrapers without the key",
    )
    parser.add_argument(
        "--allowed-origins",
        nargs="+",
        default=None,
        help="CORS: the origins browsers may call from, or '*' (default: no CORS headers)",
    )
    parser.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help='tool_choice "auto": the model calls tools in its own syntax (needs --tool-call-parser)',
    )
    parser.add_argument(
        "--tool-call-parser",
        default=None,
        help="the syntax of the model's tool calls: hermes, llama3_json, mistral, qwen3_xml, "
        "qwen3_coder, pythonic",
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
    ns: argparse.Namespace, engine_args: EngineArgs, engine_config: Any | None = None
) -> Any:
    """The server's settings; `engine_config` (the started engine's) fills the model path and
    the defaults that depend on it (checked once before the engine starts, without it)."""
    from pagedllm.entrypoints.openai.serving_engine import ServingConfig
    from pagedllm.models.default import DEFAULT_MODEL

    tag = engine_args.model or DEFAULT_MODEL
    max_num_waiting = ns.max_num_waiting
    if max_num_waiting is None and engine_config is not None:
        max_num_waiting = max(1024, 4 * engine_config.scheduler_config.max_num_seqs)
    elif max_num_waiting is not None and max_num_waiting < 0:
        max_num_waiting = None
    if ns.request_timeout is not None and not ns.request_timeout > 0:
        raise ValueError(f"--request-timeout must be positive, got {ns.request_timeout}")
    return ServingConfig(
        served_model_names=tuple(ns.served_model_name or [tag]),
        model_path=engine_config.model_config.model if engine_config is not None else tag,
        chat_template=read_chat_template(ns.chat_template),
        default_max_tokens=_positive(ns.default_max_tokens, "--default-max-tokens"),
        max_request_body_bytes=_positive(ns.max_request_body_bytes, "--max-request-body-bytes"),
        max_prompts=_positive(ns.max_prompts, "--max-prompts"),
        max_messages=_positive(ns.max_messages, "--max-messages"),
        max_num_waiting=max_num_waiting,
        request_timeout=ns.request_timeout,
        metrics_unauthenticated=ns.metrics_unauthenticated,
        trust_request_chat_template=ns.trust_request_chat_template,
        allowed_origins=tuple(ns.allowed_origins) if ns.allowed_origins else None,
        enable_auto_tool_choice=ns.enable_auto_tool_choice,
        tool_call_parser=_tool_call_parser(ns),
    )


def _tool_call_parser(ns: argparse.Namespace) -> str | None:
    from pagedllm.entrypoints.openai.tool_parsers import get_tool_parser

    if ns.tool_call_parser is not None:
        get_tool_parser(ns.tool_call_parser)  # NOTE: an unknown name fails the start-up
    elif ns.enable_auto_tool_choice:
        raise ValueError("--enable-auto-tool-choice needs --tool-call-parser")
    return ns.tool_call_parser


def _positive(value: Any, flag: str) -> Any:
    if value is not None and value < 1:
        raise ValueError(f"{flag} must be at least 1, got {value}")
    return value
