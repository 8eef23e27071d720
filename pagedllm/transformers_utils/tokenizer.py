"""The model's tokenizer."""

from __future__ import annotations

import logging
from typing import Any

logger = logging.getLogger(__name__)


def get_tokenizer(path: str | None) -> Any | None:
    """The HF tokenizer at `path`, or None (with a warning) when the model has none."""
    if path is None:
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        logger.warning("no tokenizer at %s (%s): only token-id prompts will work", path, e)
        return None
