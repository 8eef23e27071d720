"""The model's HF-style config, from a checkpoint folder or a bare config.json."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def get_hf_config(model_path: str) -> Any:
    from transformers import AutoConfig

    if model_path.endswith(".json"):
        data = json.loads(Path(model_path).read_text())
        return AutoConfig.for_model(**data)
    return AutoConfig.from_pretrained(model_path)
