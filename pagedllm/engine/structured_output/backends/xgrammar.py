"""The xgrammar backend: JSON schemas, any JSON object, regexes, choices, EBNF grammars and
structural tags, compiled against the model's vocabulary into grammars whose matchers fill a
token bitmask (int32 [rows, ceil(vocab / 32)]: bit j of word i set when token 32 i + j may come
next) and advance on the accepted tokens.

Two costs, kept apart:
- `check` builds the grammar from the spec alone (no vocabulary; milliseconds): the input
  processor calls it so a bad schema is a ValueError when the request is made;
- `XgrammarBackend.compile` turns it into the vocabulary's token masks (the slow part, up to
  seconds for a large schema): the manager runs it in a thread, never in the step loop.
  xgrammar's compiler keeps a cache keyed by the spec, so a repeated schema compiles once
  (bounded by `GRAMMAR_CACHE_BYTES`: the least recently used grammars leave it).
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from pagedllm.sampling_params import StructuredOutputsParams

# The compiled-grammar cache's bound (xgrammar evicts the least recently used past it).
GRAMMAR_CACHE_BYTES = 256 * 1024**2


def _choice_grammar(choices: list[str]) -> str:
    """EBNF for "one of these strings"."""
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


# NOTE: two gaps of xgrammar 0.2.9's JSON grammars, closed by rewriting their string rules:
# - a string with minLength / maxLength takes its characters from `[^"\\\r\n]`, which admits
#   raw control characters (invalid JSON: `json.loads` refuses them);
# - every negated class admits the UTF-8 encodings of the surrogates U+D800-U+DFFF (bytes ED
#   A0-BF xx), which are not UTF-8: the text would decode to replacement characters (a random
#   model finds them; a string's length would then be counted wrong).
# Both classes become the strict one: any character but controls, quote, backslash, surrogates.
_LOOSE_STRING_CHARS = ('[^\\0-\\x1f\\"\\\\\\r\\n]', '[^\\"\\\\\\r\\n]')
_STRICT_STRING_CHARS = '[^\\0-\\x1f\\"\\\\\\uD800-\\uDFFF]'


def _json_grammar(xgr: Any, schema: str, any_whitespace: bool) -> Any:
    text = str(xgr.Grammar.from_json_schema(schema, any_whitespace=any_whitespace))
    for loose in _LOOSE_STRING_CHARS:
        text = text.replace(loose, _STRICT_STRING_CHARS)
    return xgr.Grammar.from_ebnf(text)


def _grammar(xgr: Any, spec: StructuredOutputsParams) -> Any:
    """The spec as an `xgrammar.Grammar` (no vocabulary needed)."""
    kind = spec.kind
    any_whitespace = not spec.disable_any_whitespace
    if kind == "json":
        assert isinstance(spec.json, str)
        return _json_grammar(xgr, spec.json, any_whitespace)
    if kind == "json_object":
        return _json_grammar(xgr, '{"type": "object"}', any_whitespace)
    if kind == "regex":
        return xgr.Grammar.from_regex(spec.regex)
    if kind == "choice":
        assert spec.choice is not None
        return xgr.Grammar.from_ebnf(_choice_grammar(spec.choice))
    if kind == "grammar":
        return xgr.Grammar.from_ebnf(spec.grammar)
    assert kind == "structural_tag"
    return xgr.Grammar.from_structural_tag(spec.structural_tag)


def _error_text(error: Exception) -> str:
    """xgrammar's message without its C++ location prefix ("[12:00:00] file.cc:12: ...")."""
    text = str(error).strip()
    if text.startswith("[") and ": " in text:
        text = text.split(": ", 1)[1]
    return text.splitlines()[0] if text else type(error).__name__


def check(spec: StructuredOutputsParams) -> None:
    """Raises ValueError naming the field when the spec cannot become a grammar."""
    import xgrammar as xgr

    try:
        _grammar(xgr, spec)
    except Exception as e:
        what = {
            "json": "JSON schema",
            "regex": "regular expression",
            "choice": "choice",
            "grammar": "grammar",
            "json_object": "JSON object",
            "structural_tag": "structural tag",
        }[spec.kind]
        raise ValueError(f"structured_outputs.{spec.kind}: invalid {what}: {_error_text(e)}") from e


class XgrammarGrammar:
    """One request's matcher over a compiled grammar."""

    def __init__(self, matcher: Any) -> None:
        self.matcher = matcher
        # NOTE: a matcher terminates only on a stop token: asked only then (once per token
        # for every constrained row otherwise).
        self._stop_ids = frozenset(matcher.stop_token_ids)
        self._terminated = False

    def accept_token(self, token_id: int) -> bool:
        """Advances on `token_id`; False when the grammar forbids it (the matcher is unchanged)."""
        accepted = bool(self.matcher.accept_token(token_id))
        if accepted and token_id in self._stop_ids:
            self._terminated = bool(self.matcher.is_terminated())
        return accepted

    @property
    def is_terminated(self) -> bool:
        """Whether the grammar is complete and accepted its stop token: nothing may follow."""
        return self._terminated


class XgrammarBackend:
    """Compiles specs against one tokenizer's vocabulary (`vocab_size`: the model's logits
    width, which may exceed the tokenizer's); `stop_token_ids` end a complete grammar."""

    def __init__(
        self,
        tokenizer: Any,
        vocab_size: int,
        stop_token_ids: list[int],
        max_threads: int | None = None,
    ) -> None:
        """`max_threads`: for compiling and for filling a step's masks (None: half the CPUs,
        from 1 to 8)."""
        if max_threads is None:
            max_threads = min(8, max(1, (os.cpu_count() or 2) // 2))
        import xgrammar as xgr

        self._xgr = xgr
        hf = getattr(tokenizer, "hf_tokenizer", tokenizer)  # FastTokenizer wraps transformers'
        info = xgr.TokenizerInfo.from_huggingface(
            hf, vocab_size=vocab_size, stop_token_ids=stop_token_ids or None
        )
        self.vocab_size = vocab_size
        self.num_words = -(-vocab_size // 32)
        # NOTE: bounded: an unbounded cache grows with every distinct schema a client sends.
        self.compiler = xgr.GrammarCompiler(
            info, max_threads=max_threads, cache_enabled=True, cache_limit_bytes=GRAMMAR_CACHE_BYTES
        )
        self._batch = xgr.BatchGrammarMatcher(max_threads)

    def compile(self, spec: StructuredOutputsParams) -> Any:
        """The compiled grammar of `spec` (slow: call it off the step loop); ValueError if the
        spec is invalid."""
        xgr = self._xgr
        try:
            return self.compiler.compile_grammar(_grammar(xgr, spec))
        except Exception as e:
            raise ValueError(f"structured_outputs.{spec.kind}: {_error_text(e)}") from e

    def new_matcher(self, compiled: Any) -> XgrammarGrammar:
        return XgrammarGrammar(self._xgr.GrammarMatcher(compiled))

    def fill_bitmask(self, matchers: list[Any], bitmask: np.ndarray, rows: list[int]) -> None:
        """Fills `bitmask[rows[i]]` with the tokens `matchers[i]` (`XgrammarGrammar.matcher`)
        allow next (in xgrammar's threads, without the GIL)."""
        self._batch.batch_fill_next_token_bitmask(matchers, bitmask, rows)
