"""`HostStager`: a step's host↔device copies through persistent pinned arenas.

`tensor.pin_memory()` per input costs a `cudaHostAlloc` each (tens of µs, and it may serialize
with the GPU), and a copy from pageable memory makes the stream wait. Instead every array of a
step is written into one pinned buffer (a bump allocator, reset at the start of each step) and
copied from there with `non_blocking=True`; the step's results come back the same way, with one
wait for all of them.

Two sets of arenas alternate, one per step, so that a step can be prepared while the one before
is still on the GPU (async scheduling). NOTE: `next_step` reuses the set of the step before the
previous one, whose copies must be done: the runner collects step N-1 before it launches N+1.
On the CPU there is nothing to copy: arrays become tensors sharing their memory.
"""

from __future__ import annotations

import math

import numpy as np
import torch

_ALIGN = 64


class _PinnedArena:
    """Pinned host memory handed out in aligned chunks until `reset`."""

    def __init__(self, capacity: int) -> None:
        self._buf = torch.empty(capacity, dtype=torch.uint8, pin_memory=True)
        self._offset = 0
        self._retired: list[torch.Tensor] = []  # outgrown buffers whose copies may be in flight

    def reset(self) -> None:
        self._offset = 0
        self._retired.clear()

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        nbytes = math.prod(shape) * dtype.itemsize
        if self._offset + nbytes > self._buf.numel():
            self._retired.append(self._buf)
            size = max(2 * self._buf.numel(), 2 * nbytes)
            self._buf = torch.empty(size, dtype=torch.uint8, pin_memory=True)
            self._offset = 0
        chunk = self._buf[self._offset : self._offset + nbytes]
        self._offset += -(-nbytes // _ALIGN) * _ALIGN
        return chunk.view(dtype).view(shape)


class PendingHost:
    """Device→host copies in flight; `wait()` gives the host arrays."""

    def __init__(self, host: list[torch.Tensor], event: torch.cuda.Event | None) -> None:
        self._host = host
        self._event = event

    def wait(self) -> list[np.ndarray]:
        if self._event is not None:
            self._event.synchronize()
        return [h.numpy() for h in self._host]


class HostStager:
    def __init__(self, device: torch.device, capacity: int = 1 << 20) -> None:
        self.device = device
        self.pinned = device.type == "cuda"
        if self.pinned:
            self._sets = [(_PinnedArena(capacity), _PinnedArena(capacity)) for _ in range(2)]
            self._current = 0
            self._up, self._down = self._sets[0]

    def next_step(self) -> None:
        """Switches to the other set of arenas and empties it."""
        if self.pinned:
            self._current ^= 1
            self._up, self._down = self._sets[self._current]
            self._up.reset()
            self._down.reset()

    def _stage(self, a: np.ndarray) -> torch.Tensor:
        """A pinned host tensor holding a copy of `a`."""
        src = torch.from_numpy(np.ascontiguousarray(a))
        host = self._up.take(tuple(src.shape), src.dtype)
        host.copy_(src)
        return host

    def to_device(self, a: np.ndarray) -> torch.Tensor:
        """`a` on the device (on the CPU: a tensor sharing `a`'s memory)."""
        if not self.pinned:
            return torch.from_numpy(np.ascontiguousarray(a))
        return self._stage(a).to(self.device, non_blocking=True)

    def copy_into(self, a: np.ndarray, dst: torch.Tensor) -> None:
        """`dst.copy_(a)`, asynchronously; `dst` is contiguous with `a`'s shape."""
        if not self.pinned:
            dst.copy_(torch.from_numpy(np.ascontiguousarray(a)))
        else:
            dst.copy_(self._stage(a), non_blocking=True)

    def to_host(self, tensors: list[torch.Tensor]) -> PendingHost:
        """Starts copying the tensors to the host; the arrays `wait()` returns are views of the
        arena, valid until this arena set is reused (two `next_step` calls later)."""
        if not self.pinned:
            return PendingHost(list(tensors), None)
        host = [self._down.take(tuple(t.shape), t.dtype) for t in tensors]
        for dst, src in zip(host, tensors):
            dst.copy_(src, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return PendingHost(host, event)
