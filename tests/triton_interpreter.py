"""Fixes for two bugs of Triton's CPU interpreter (triton <= 3.9), for the tests only.

- `int()` of a scalar: the interpreter holds scalars as shape-(1,) arrays, which numpy >= 2.4
  refuses to convert, so a loop with a runtime bound (`range(0, n, BLOCK)`) fails;
- `tl.dot` of bf16 operands: stored as uint16, they are multiplied as integers;
- fp32 -> bf16 casts truncate (a GPU rounds to nearest even), so results would differ from
  torch's by up to a whole rounding step instead of half;
- fp8 (e4m3) likewise: `tl.dot` multiplies the stored bytes as integers, and fp32 -> e4m3 casts
  drop the carry of a rounding into the next power of two (127.1 becomes 64).

Call `patch_interpreter()` after setting `TRITON_INTERPRET=1` and before running a kernel.
`one_thread`: a module fixture for kernel tests (import it into the test module).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import pytest


def kernel_test_device() -> str:
    """ "cuda", or "cpu" with Triton's interpreter on (set before triton is first imported: call
    this at the top of a kernel test module); skips the module when neither can run."""
    import os

    import torch

    if torch.cuda.is_available():
        device = "cuda"
    else:
        device = "cpu"
        os.environ.setdefault("TRITON_INTERPRET", "1")
        if os.environ["TRITON_INTERPRET"] != "1":
            pytest.skip("no GPU and TRITON_INTERPRET is not 1", allow_module_level=True)
    pytest.importorskip("triton", reason="triton is not installed")
    return device


@pytest.fixture(autouse=True, scope="module")
def one_thread() -> Iterator[None]:
    """The interpreter's numpy ops are tiny: a second intra-op thread only adds barrier waits."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@functools.cache
def patch_interpreter() -> None:
    import numpy as np
    import torch
    import triton
    from triton.runtime import interpreter

    patch_tensor = interpreter._patch_lang_tensor

    def patched_tensor(tensor: Any, scope: Any) -> None:
        patch_tensor(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    create_dot = interpreter.InterpreterBuilder.create_dot

    def as_float(h: interpreter.TensorHandle) -> interpreter.TensorHandle:
        if h.dtype == triton.language.float8e4nv:
            data = torch.from_numpy(np.ascontiguousarray(h.data).view(np.uint8))
            values = data.view(torch.float8_e4m3fn).float().numpy()
            return interpreter.TensorHandle(values, triton.language.float32)
        if h.dtype != triton.language.bfloat16:
            return h
        bits = h.data.astype(np.uint32) << 16
        return interpreter.TensorHandle(bits.view(np.float32), triton.language.float32)

    def patched_dot(self, a, b, d, input_precision, max_num_imprecise_acc):  # type: ignore[no-untyped-def]
        return create_dot(self, as_float(a), as_float(b), d, input_precision, max_num_imprecise_acc)

    cast_impl = interpreter.InterpreterBuilder.cast_impl

    def patched_cast(self, src, dst_type):  # type: ignore[no-untyped-def]
        if (
            src.dtype.scalar == triton.language.float32
            and dst_type.scalar == triton.language.bfloat16
        ):
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            bits = data.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            return interpreter.TensorHandle(bits, triton.language.bfloat16)
        return cast_impl(self, src, dst_type)

    fp_to_fp = interpreter.InterpreterBuilder.create_fp_to_fp

    def patched_fp_to_fp(self, src, dst_type, rounding_mode):  # type: ignore[no-untyped-def]
        if (
            src.dtype.scalar == triton.language.float32
            and dst_type.scalar == triton.language.float8e4nv
        ):
            data = torch.from_numpy(np.ascontiguousarray(src.data, dtype=np.float32))
            fp8 = data.to(torch.float8_e4m3fn).view(torch.uint8).numpy()
            return interpreter.TensorHandle(fp8, triton.language.float8e4nv)
        return fp_to_fp(self, src, dst_type, rounding_mode)

    interpreter._patch_lang_tensor = patched_tensor
    interpreter.InterpreterBuilder.cast_impl = patched_cast
    interpreter.InterpreterBuilder.create_dot = patched_dot
    interpreter.InterpreterBuilder.create_fp_to_fp = patched_fp_to_fp


def interpret_without_cuda() -> bool:
    """For a model test module whose tests also run the Triton kernels: call it at the top,
    before triton is imported. Without CUDA it turns Triton's interpreter on; it returns whether
    triton was imported too early for that (another module imported it without the
    interpreter: Triton reads `TRITON_INTERPRET` when a kernel is defined)."""
    import os
    import sys

    import torch

    too_early = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
    return too_early


def force_fused_kernels(monkeypatch: pytest.MonkeyPatch, too_early: bool) -> None:
    """A test that runs a model through its Triton kernels: on CUDA as they are; without CUDA
    under the interpreter (skipped when `too_early`), with the fused kernels forced on and the
    linears' GEMV (tested in tests/layers/test_gemv.py) off."""
    import os

    import torch

    pytest.importorskip("triton", reason="triton is not installed")
    if torch.cuda.is_available():
        return
    if os.environ.get("TRITON_INTERPRET") != "1" or too_early:
        pytest.skip("no GPU, and triton was imported without TRITON_INTERPRET=1")
    from pagedllm.layers import fused

    patch_interpreter()
    monkeypatch.setattr(fused, "enabled", lambda x, switch=None: True)
    monkeypatch.setattr(fused, "gemv_enabled", lambda: False, raising=False)
