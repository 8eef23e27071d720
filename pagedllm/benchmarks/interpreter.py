"""Kernel benchmarks on the CPU: Triton's interpreter, as a smoke test of the scripts."""

from __future__ import annotations

import os
import sys


def use_interpreter() -> None:
    """CPU tensors run the kernels under Triton's interpreter (set before triton is imported)."""
    if "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        raise SystemExit("--device cpu needs TRITON_INTERPRET=1 before triton is imported")
    os.environ["TRITON_INTERPRET"] = "1"
    try:  # NOTE: the interpreter's bug fixes live with the tests (a source checkout only)
        from tests.triton_interpreter import patch_interpreter

        patch_interpreter()
    except ImportError:
        pass
