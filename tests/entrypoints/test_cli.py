"""The `pagedllm` command's parser (--version, help text and defaults) and `pagedllm chat`'s slash
commands, without a model."""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

import pagedllm
from pagedllm.entrypoints import cli, interactive
from pagedllm.entrypoints.interactive import CHAT_COMMANDS, ChatSession

SAMPLING_FLAGS = (
    "--max-tokens",
    "--temperature",
    "--top-p",
    "--top-k",
    "--min-p",
    "--repetition-penalty",
    "--sampling-seed",
    "--stop",
)


@pytest.fixture(autouse=True)
def _wide_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    # NOTE: argparse wraps help to $COLUMNS; a fixed width keeps the output the same everywhere.
    monkeypatch.setenv("COLUMNS", "120")


def help_text(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """What `pagedllm ARGV --help` prints (it exits 0)."""
    with pytest.raises(SystemExit) as exit_info:
        cli.main([*argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def option_entries(text: str) -> dict[str, str]:
    """Each option's help entry (its flags, then its help, whitespace collapsed), by flag."""
    entries: dict[str, str] = {}
    current: list[str] = []

    def flush() -> None:
        if current:
            entry = " ".join(" ".join(current).split())
            for flag in re.findall(r"(?:^|, )(--?[\w-]+)", entry.split("  ")[0]):
                entries[flag] = entry
            current.clear()

    for line in text.splitlines():
        if re.match(r"^  -", line):
            flush()
            current.append(line)
        elif current and line.startswith("   "):
            current.append(line)
        else:
            flush()
    flush()
    return entries


def help_of(entry: str, flag: str) -> str:
    """The help part of an option entry: what follows its flags and metavars."""
    invocation = re.match(rf"^{re.escape(flag)}(?: [A-Z_]+)*(?:, --[\w-]+(?: [A-Z_]+)*)*", entry)
    assert invocation is not None, entry
    return entry[invocation.end() :].strip()


# ----- --version -----


def test_version_prints_the_version_and_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"pagedllm {pagedllm.__version__}\n"


def test_version_from_the_module_entry_point() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "pagedllm.entrypoints.cli", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"pagedllm {pagedllm.__version__}"


# ----- help text -----


def test_help_does_not_point_outside_the_repository(capsys: pytest.CaptureFixture[str]) -> None:
    top = help_text([], capsys)
    bench = help_text(["bench"], capsys)
    for text in (top, bench):
        assert "shared/" not in text
        assert "BENCHMARKS.md" not in text
    assert cli.BENCH_HELP in " ".join(top.split())
    assert "T1 throughput" in bench and "T4 serving" in bench


def test_serve_help_shows_the_port_and_host_defaults(
    capsys: pytest.CaptureFixture[str],
) -> None:
    entries = option_entries(help_text(["serve"], capsys))
    assert "(default: 8000)" in entries["--port"]
    assert "(default: 0.0.0.0)" in entries["--host"]
    assert "(default: 0.9)" in entries["--gpu-memory-utilization"]


def test_generate_help_shows_sampling_defaults_and_a_help_line_per_flag(
    capsys: pytest.CaptureFixture[str],
) -> None:
    entries = option_entries(help_text(["generate"], capsys))
    assert "(default: the model's generation config, else 256)" in entries["--max-tokens"]
    assert "(default: the model's generation config, else 1.0)" in entries["--temperature"]
    for flag in SAMPLING_FLAGS:
        described = re.sub(r"\(default: [^)]*\)", "", help_of(entries[flag], flag)).strip()
        assert len(described.split()) >= 3, f"{flag} has no help text: {entries[flag]!r}"


def test_chat_help_shows_its_own_max_tokens_default(capsys: pytest.CaptureFixture[str]) -> None:
    entries = option_entries(help_text(["chat"], capsys))
    assert "(default: the model's generation config, else 512)" in entries["--max-tokens"]


def test_sampling_flags_given_win_over_the_generation_config() -> None:
    from pagedllm.entrypoints.interactive import sampling_params_from_args

    parser = cli.build_parser()
    defaults = {"temperature": 0.2, "top_p": 0.9, "max_tokens": 40}
    ns = parser.parse_args(["chat"])
    params = sampling_params_from_args(ns, defaults)
    assert (params.temperature, params.top_p, params.max_tokens) == (0.2, 0.9, 40)
    ns = parser.parse_args(["chat", "--temperature", "0.5", "--max-tokens", "7", "--top-k", "3"])
    params = sampling_params_from_args(ns, defaults)
    assert (params.temperature, params.top_p, params.max_tokens, params.top_k) == (0.5, 0.9, 7, 3)
    # No generation config: SamplingParams' defaults, and the command's own max_tokens.
    params = sampling_params_from_args(parser.parse_args(["generate", "hi"]), {})
    assert (params.temperature, params.max_tokens) == (1.0, 256)
    with pytest.raises(ValueError, match="temperature"):
        sampling_params_from_args(parser.parse_args(["generate", "hi", "--temperature", "-1"]))


@pytest.mark.parametrize(
    "argv",
    [["generate"], ["chat"], ["serve"], ["download"], ["bench", "throughput"],
     ["bench", "latency"], ["bench", "startup"], ["bench", "serve"]],
)  # fmt: skip
def test_no_none_defaults_in_help(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    text = help_text(argv, capsys)
    assert "(default: None)" not in text
    assert "(default: False)" not in text or "--no-" in text  # only on/off switches show False


def test_the_api_key_from_the_environment_stays_out_of_the_help(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("PAGEDLLM_API_KEY", "sk-very-secret")
    assert "sk-very-secret" not in help_text(["serve"], capsys)


def test_formatter_skips_uninformative_defaults() -> None:
    parser = argparse.ArgumentParser(prog="x", formatter_class=cli.HelpFormatter)
    parser.add_argument("--count", type=int, default=3)
    parser.add_argument("--name", default=None, help="a name")
    parser.add_argument("--quiet", action="store_true", help="say less")
    parser.add_argument("--eager", action=argparse.BooleanOptionalAction, default=False)
    parser.add_argument("--where", default="here", help="a place (default: there, or here)")
    entries = option_entries(parser.format_help())
    assert "(default: 3)" in entries["--count"]
    assert "default" not in entries["--name"]
    assert "default" not in entries["--quiet"]
    assert "(default: False)" in entries["--eager"]
    assert entries["--where"].count("default") == 1


# ----- chat commands -----


def test_plain_text_is_not_a_command() -> None:
    session = ChatSession(system="be brief")
    assert session.handle_command("hello there") is None
    assert session.handle_command("what is 1/2?") is None
    assert not session.finished


def test_help_lists_every_command() -> None:
    out = ChatSession().handle_command("/help")
    assert out is not None
    for name in ("/help", "/reset", "/exit", "/quit"):
        assert name in out
    assert set(CHAT_COMMANDS) == {"/help", "/reset", "/exit", "/quit"}


def test_reset_clears_the_conversation_but_keeps_the_system_message() -> None:
    session = ChatSession(system="be brief")
    messages = session.messages
    messages += [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert session.handle_command("/reset")
    assert session.messages is messages  # cleared in place: the chat loop holds this list
    assert messages == [{"role": "system", "content": "be brief"}]


def test_reset_without_a_system_message_empties_the_conversation() -> None:
    session = ChatSession()
    session.messages.append({"role": "user", "content": "hi"})
    session.handle_command("/reset")
    assert session.messages == []


def test_unknown_command_is_reported_and_not_sent() -> None:
    session = ChatSession(system="be brief")
    before = list(session.messages)
    out = session.handle_command("/frobnicate the thing")
    assert out == "unknown command /frobnicate; /help lists them"
    assert session.messages == before
    assert not session.finished


@pytest.mark.parametrize("command", ["/exit", "/quit"])
def test_exit_and_quit_end_the_chat(command: str) -> None:
    session = ChatSession()
    assert session.handle_command(command) == ""
    assert session.finished


class FakeLLM:
    """Stands in for `LLM` in the chat loop: records each conversation it renders."""

    def __init__(self) -> None:
        self.rendered: list[list[dict[str, str]]] = []
        model_config = SimpleNamespace(sampling_defaults={"temperature": 0.3})
        self.llm_engine = SimpleNamespace(config=SimpleNamespace(model_config=model_config))

    def render_chat(self, messages: list[dict[str, str]], chat_template: Any = None) -> str:
        self.rendered.append([dict(m) for m in messages])
        return "PROMPT"


def test_chat_loop_sends_only_messages_to_the_model(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    llm = FakeLLM()
    lines = iter(["/nope", "hello", "/help", "/reset", "again", "/exit", "never read"])

    def fake_stream(llm: Any, prompt: Any, params: Any) -> Iterator[str]:
        yield "a reply"

    monkeypatch.setattr(interactive, "_load_llm", lambda ns: llm)
    monkeypatch.setattr(interactive, "stream_text", fake_stream)
    monkeypatch.setattr("builtins.input", lambda prompt="": next(lines))
    ns = cli.build_parser().parse_args(["chat", "--system", "be brief"])
    interactive.run_chat(ns)

    system = {"role": "system", "content": "be brief"}
    assert llm.rendered == [
        [system, {"role": "user", "content": "hello"}],
        [system, {"role": "user", "content": "again"}],  # after /reset
    ]
    out = capsys.readouterr().out
    assert "/help lists the commands" in out.splitlines()[0]
    assert "unknown command /nope; /help lists them" in out
    assert CHAT_COMMANDS["/reset"] in out
    assert next(lines) == "never read"  # /exit ended the loop
