"""The model's generation config → the SamplingParams defaults a request gets for what it omits.

vLLM's `--generation-config`: `auto` reads `generation_config.json` from the model folder,
`vllm` uses none (SamplingParams' own defaults), a folder path reads that folder's file.
`--override-generation-config` (a dict, or its JSON) wins over the file. Only sampling fields
are taken (HF names; `max_new_tokens` becomes `max_tokens`); `do_sample` is ignored, as vLLM
does. Plain Python (json only): the engine's pure-Python parts call it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

# generation_config.json field → SamplingParams field.
SAMPLING_FIELDS = {
    "temperature": "temperature",
    "top_p": "top_p",
    "top_k": "top_k",
    "min_p": "min_p",
    "repetition_penalty": "repetition_penalty",
    "max_new_tokens": "max_tokens",
}


def _read(folder: str | Path) -> dict[str, Any]:
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"generation_config: cannot read {path}: {e}") from e
    if not isinstance(data, dict):
        raise ValueError(f"generation_config: {path} does not hold a JSON object")
    return data


def _parse_override(override: dict[str, Any] | str | None) -> dict[str, Any]:
    if override is None or override == "":
        return {}
    if isinstance(override, str):
        try:
            override = json.loads(override)
        except ValueError as e:
            raise ValueError(f"override_generation_config is not JSON: {e}") from e
    if not isinstance(override, dict):
        raise ValueError("override_generation_config must be a JSON object")
    unknown = sorted(set(override) - set(SAMPLING_FIELDS))
    if unknown:
        raise ValueError(
            f"override_generation_config: unknown fields {unknown}; "
            f"known: {', '.join(SAMPLING_FIELDS)}"
        )
    return override


def sampling_defaults(
    source: str,
    model_dir: str | None,
    builtin: dict[str, Any] | None = None,
    override: dict[str, Any] | str | None = None,
) -> dict[str, Any]:
    """The SamplingParams keyword defaults. `source`: "auto", "vllm" or a folder; `model_dir`:
    the model's folder (None for a bare config); `builtin`: defaults below the file's (pagedllm's
    own for the default model, in HF names), used with "auto" only."""
    if source == "vllm":
        fields: dict[str, Any] = {}
    elif source == "auto":
        fields = {**(builtin or {}), **(_read(model_dir) if model_dir else {})}
    else:
        if not Path(source, "generation_config.json").is_file():
            raise ValueError(
                f"generation_config={source!r}: expected 'auto', 'vllm' or a folder holding "
                f"generation_config.json"
            )
        fields = _read(source)
    fields.update(_parse_override(override))
    defaults = {SAMPLING_FIELDS[k]: v for k, v in fields.items() if k in SAMPLING_FIELDS}
    defaults = {k: v for k, v in defaults.items() if v is not None}
    from pagedllm.sampling_params import SamplingParams

    try:
        SamplingParams(**defaults)
    except ValueError as e:
        raise ValueError(f"generation_config: {e}") from e
    return defaults
