"""`pagedllm.engine` is plain Python: importing every module of it loads no torch."""

import subprocess
import sys

CODE = """
import importlib, pkgutil, sys
import pagedllm.engine as eng
for m in pkgutil.iter_modules(eng.__path__):
    importlib.import_module(f"pagedllm.engine.{m.name}")
import pagedllm.config, pagedllm.sampling_params, pagedllm.outputs
heavy = [name for name in ("torch", "transformers", "numpy") if name in sys.modules]
assert not heavy, heavy
print("ok")
"""


def test_engine_imports_no_torch() -> None:
    result = subprocess.run(
        [sys.executable, "-c", CODE], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"
