"""Weights from a folder of safetensors files, streamed one tensor at a time.

The folder holds `model.safetensors`, or shards listed by `model.safetensors.index.json`.
NOTE: the folder is local; `EngineArgs` resolves model names before anything is loaded.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from pagedllm.config import ModelConfig
from pagedllm.loader.model_loader import load_and_check_weights

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


def resolve_model_dir(model: str) -> Path:
    path = Path(model).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"no model folder at {model}")
    return path


def safetensors_files(folder: Path) -> list[Path]:
    """The checkpoint's safetensors files: the index's shards, `model.safetensors`, or all."""
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(weight_map.values()))]
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    # NOTE: Mistral repos also ship `consolidated*.safetensors` in another naming scheme.
    files = sorted(p for p in folder.glob("*.safetensors") if not p.name.startswith("consolidated"))
    if not files:
        present = ", ".join(sorted(p.name for p in folder.iterdir())[:20]) or "nothing"
        raise FileNotFoundError(
            f"no safetensors weights in {folder} (found: {present}); pagedllm loads "
            f"'{SINGLE_FILE}' or the shards of '{INDEX_FILE}' (convert .bin/.pt checkpoints "
            "to safetensors, or use load_format='dummy')"
        )
    return files


def iterate_safetensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    """`(name, tensor)` pairs, read lazily from each file on the host."""
    for file in files:
        with safe_open(str(file), framework="pt", device="cpu") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                yield name, f.get_tensor(name)


def load_safetensors_weights(model: nn.Module, model_config: ModelConfig) -> None:
    """Fills `model` from the safetensors checkpoint in `model_config.model`."""
    files = safetensors_files(resolve_model_dir(model_config.model))
    load_and_check_weights(model, iterate_safetensors(files))
