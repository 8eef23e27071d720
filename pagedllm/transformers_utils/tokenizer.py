"""The model's tokenizer: a thin wrapper over `tokenizers` where that is exact, else transformers.

Why: `AutoTokenizer.from_pretrained` imports transformers (~1 s) and its model-config modules
(~2-3 s more on a small CPU) before it reads a single file, most of a warm start-up. When the
folder's tokenizer is just the `tokenizers` pipeline of its tokenizer.json (tokenizer_config's
class is `TokenizersBackend`/`PreTrainedTokenizerFast` and AutoTokenizer would keep that class),
`FastTokenizer` loads it with `tokenizers.Tokenizer.from_file` and applies tokenizer_config.json
the way transformers does (special tokens, added tokens, chat template). Its methods follow
transformers 5's semantics; tests/test_transformers_utils.py pins them against AutoTokenizer.
Everything else (other tokenizer classes, model types whose tokenizer transformers rebuilds,
remote code, legacy special-token files) loads through AutoTokenizer, as before.

`FastTokenizer` lives in fast_tokenizer.py; this module decides which one a folder gets.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from pagedllm.transformers_utils.fast_tokenizer import FastTokenizer

logger = logging.getLogger(__name__)

FAST_TOKENIZER_CLASSES = frozenset({"TokenizersBackend", "PreTrainedTokenizerFast"})
# NOTE: model types for which AutoTokenizer keeps tokenizer_config's class (tested). Others may be
# rerouted: e.g. qwen2 folders load as Qwen2Tokenizer, which rebuilds its own pre-tokenizer.
FAST_MODEL_TYPES = frozenset({"llama", "mistral", "qwen3"})


def get_tokenizer(path: str | None) -> Any | None:
    """The tokenizer at `path` (FastTokenizer where exact, else transformers'), or None (with
    a warning) when the folder has none."""
    if path is None:
        return None
    config, reason = fast_path_config(path)
    if config is not None:
        return FastTokenizer(path, config)
    logger.debug("tokenizer of %s loads through transformers: %s", path, reason)
    return _auto_tokenizer(path)


def _auto_tokenizer(path: str) -> Any | None:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        logger.warning("no tokenizer at %s (%s): only token-id prompts will work", path, e)
        return None


def fast_path_config(path: str) -> tuple[dict[str, Any] | None, str]:
    """tokenizer_config.json's dict when FastTokenizer loads `path` exactly, else (None, why)."""
    folder = Path(path)
    if not (folder / "tokenizer.json").is_file():
        return None, "no tokenizer.json"
    try:
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        return None, f"no readable tokenizer_config.json ({e})"
    if not isinstance(config, dict):
        return None, "tokenizer_config.json is not an object"
    cls = config.get("tokenizer_class")
    if cls not in FAST_TOKENIZER_CLASSES:
        return None, f"tokenizer_class {cls!r}"
    for key in ("auto_map", "fast_tokenizer_files", "fix_mistral_regex"):
        if key in config:
            return None, f"tokenizer_config has {key!r}"
    for name in ("additional_chat_templates", "tekken.json"):
        if (folder / name).exists():
            return None, f"the folder has {name}"
    legacy = ("special_tokens_map.json", "added_tokens.json")
    if "added_tokens_decoder" not in config and any((folder / f).is_file() for f in legacy):
        return None, "legacy special-token files"
    for key, value in config.items():
        if key.endswith("_token") and not isinstance(value, (str, dict, type(None))):
            return None, f"{key} is neither a string nor an AddedToken"
    model_type = _model_type(folder)
    if model_type is not None and model_type not in FAST_MODEL_TYPES:
        return None, f"model_type {model_type!r}"
    return config, ""


def _model_type(folder: Path) -> str | None:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return None
    value = data.get("model_type") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
