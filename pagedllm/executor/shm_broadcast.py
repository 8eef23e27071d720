"""`ShmBroadcast`: one writer, N readers, a ring of slots in POSIX shared memory.

The engine core writes each message once (its bytes: the caller pickles once per message), and
every worker process reads it from the same memory: no per-reader copy through a pipe, no
per-reader pickling. Slot layout: `seq` (int64: the message number written there, from 1),
`length` (int64), `more` (one byte: the message continues in the next slot), one `read` byte per
reader, then the payload. The writer of message n waits until every reader has read message
n - slots (the slot's previous one), writes payload, length and `more`, clears the read bytes,
and writes `seq` last; reader r waits for `seq == n`, copies the payload and sets its read byte.
(Stores are not reordered on x86-64 or by CPython's memoryview writes; an ARM port would need a
fence.) A message longer than a slot spans consecutive slots.

Waiting spins for `spin_s` (default `SPIN_S`), then sleeps with a growing interval (at most
`MAX_SLEEP_S`), calling `check` between sleeps, so a dead peer raises instead of hanging. A
reader with a core of its own (a GPU worker between steps) spins longer: a sleeping reader wakes
up to one interval late, and that lateness is added to every step.
"""

from __future__ import annotations

import functools
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from multiprocessing import shared_memory

_HEADER = struct.Struct("<qqB")  # seq, length, more
SPIN_S = 50e-6
MAX_SLEEP_S = 1e-3


@dataclass(frozen=True)
class ShmHandle:
    """What a reader needs to attach (picklable)."""

    name: str
    num_readers: int
    num_slots: int
    slot_bytes: int


def _wait(ready: Callable[[], bool], check: Callable[[], None] | None, spin_s: float) -> None:
    if ready():
        return
    start = time.perf_counter()
    sleep = 0.0
    while not ready():
        if time.perf_counter() - start < spin_s:
            continue
        if check is not None:
            check()
        sleep = min(MAX_SLEEP_S, sleep * 2 or 1e-5)
        time.sleep(sleep)


def attach_untracked(name: str) -> shared_memory.SharedMemory:
    """Maps an existing segment without registering it with this process's resource tracker:
    its creator owns (and unlinks) it; a reader's exit must not."""
    try:
        return shared_memory.SharedMemory(name=name, track=False)  # type: ignore[call-arg]
    except TypeError:  # Python < 3.13: no `track`; do not register (a spawned child shares
        # its parent's tracker, where unregistering would drop the creator's entry)
        from multiprocessing import resource_tracker

        register = resource_tracker.register
        resource_tracker.register = lambda *args, **kwargs: None  # type: ignore[assignment]
        try:
            return shared_memory.SharedMemory(name=name)
        finally:
            resource_tracker.register = register  # type: ignore[assignment]


class ShmBroadcast:
    def __init__(
        self,
        handle: ShmHandle,
        reader: int | None,
        shm: shared_memory.SharedMemory,
        owner: bool,
    ) -> None:
        self.handle, self.reader, self._shm, self._owner = handle, reader, shm, owner
        assert shm.buf is not None
        self._buf: memoryview = shm.buf
        self._closed = False
        self._header = _HEADER.size + handle.num_readers
        self._payload = handle.slot_bytes - self._header
        self._next = 1  # the next message number to write or read

    @classmethod
    def create(
        cls, num_readers: int, num_slots: int = 8, slot_bytes: int = 1 << 22
    ) -> ShmBroadcast:
        if num_readers < 1 or num_slots < 2 or slot_bytes <= _HEADER.size + num_readers:
            raise ValueError("ShmBroadcast needs a reader, two slots and room for a payload")
        shm = shared_memory.SharedMemory(create=True, size=num_slots * slot_bytes)
        assert shm.buf is not None
        shm.buf[: num_slots * slot_bytes] = bytes(num_slots * slot_bytes)
        handle = ShmHandle(shm.name, num_readers, num_slots, slot_bytes)
        return cls(handle, None, shm, owner=True)

    @classmethod
    def attach(cls, handle: ShmHandle, reader: int) -> ShmBroadcast:
        if not 0 <= reader < handle.num_readers:
            raise ValueError(f"reader {reader} outside [0, {handle.num_readers})")
        return cls(handle, reader, attach_untracked(handle.name), owner=False)

    def _base(self, n: int) -> int:
        return (n % self.handle.num_slots) * self.handle.slot_bytes

    def _seq(self, base: int) -> int:
        return struct.unpack_from("<q", self._buf, base)[0]

    def _all_read(self, flags: int, done: bytes) -> bool:
        return self._buf[flags : flags + len(done)] == done

    def _written(self, base: int, n: int) -> bool:
        return self._seq(base) == n

    def write(self, data: bytes | memoryview, check: Callable[[], None] | None = None) -> None:
        """Publishes one message to every reader (blocks while the ring is full)."""
        assert self.reader is None, "a reader cannot write"
        view = memoryview(data)
        readers = self.handle.num_readers
        offset = 0
        while True:
            n, base = self._next, self._base(self._next)
            flags = base + _HEADER.size
            if self._seq(base):  # the slot's previous message must be read by all
                done = bytes([1]) * readers
                _wait(functools.partial(self._all_read, flags, done), check, SPIN_S)
            chunk = view[offset : offset + self._payload]
            offset += len(chunk)
            more = offset < len(view)
            start = base + self._header
            self._buf[start : start + len(chunk)] = chunk
            struct.pack_into("<qB", self._buf, base + 8, len(chunk), more)
            self._buf[flags : flags + readers] = bytes(readers)
            struct.pack_into("<q", self._buf, base, n)  # NOTE: last: publishes the slot
            self._next += 1
            if not more:
                return

    def read(self, check: Callable[[], None] | None = None, spin_s: float = SPIN_S) -> bytes:
        """The next message (blocks until it is written)."""
        assert self.reader is not None, "the writer cannot read"
        parts = []
        while True:
            n, base = self._next, self._base(self._next)
            _wait(functools.partial(self._written, base, n), check, spin_s)
            length, more = struct.unpack_from("<qB", self._buf, base + 8)
            start = base + self._header
            parts.append(bytes(self._buf[start : start + length]))
            self._buf[base + _HEADER.size + self.reader] = 1
            self._next += 1
            if not more:
                return parts[0] if len(parts) == 1 else b"".join(parts)

    def close(self) -> None:
        """Unmaps the ring (and, for the writer, removes it); idempotent."""
        if self._closed:
            return
        self._closed = True
        del self._buf
        self._shm.close()
        if self._owner:
            self._shm.unlink()
