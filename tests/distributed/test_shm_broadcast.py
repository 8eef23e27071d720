"""The shared-memory ring the multiprocess executor broadcasts its calls through: every reader
gets every message, in order, whole (also messages longer than a slot, and more messages than
slots while readers lag), and a writer facing a dead reader raises instead of hanging."""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import random

import pytest

from pagedllm.executor.shm_broadcast import ShmBroadcast, ShmHandle


def _messages(seed: int, count: int, slot_bytes: int) -> list[bytes]:
    rng = random.Random(seed)
    # Empty, tiny, exactly-a-slot-ish and several-slots messages.
    sizes = [0, 1, slot_bytes - 40, slot_bytes, 3 * slot_bytes + 7]
    sizes += [rng.randrange(0, 2 * slot_bytes) for _ in range(count - len(sizes))]
    return [rng.randbytes(n) for n in sizes]


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _reader(handle: ShmHandle, reader: int, count: int, out) -> None:
    queue = ShmBroadcast.attach(handle, reader)
    digests = [_digest(queue.read()) for _ in range(count)]
    queue.close()
    out.put((reader, digests))


@pytest.mark.parametrize("num_readers", [1, 3])
def test_every_reader_gets_every_message_in_order(num_readers: int) -> None:
    slot_bytes = 256
    messages = _messages(num_readers, 60, slot_bytes)
    queue = ShmBroadcast.create(num_readers, num_slots=4, slot_bytes=slot_bytes)
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [
        ctx.Process(target=_reader, args=(queue.handle, r, len(messages), out))
        for r in range(num_readers)
    ]
    for p in procs:
        p.start()
    try:
        for m in messages:  # 60 messages through 4 slots: the writer waits for the readers
            queue.write(m)
        results = dict(out.get(timeout=60) for _ in procs)
    finally:
        for p in procs:
            p.join(timeout=30)
        queue.close()
    expected = [_digest(m) for m in messages]
    assert results == {r: expected for r in range(num_readers)}


def test_in_process_round_trip_and_bad_reader() -> None:
    queue = ShmBroadcast.create(2, num_slots=2, slot_bytes=64)
    readers = [ShmBroadcast.attach(queue.handle, r) for r in range(2)]
    for m in (b"a" * 20, b"", b"xyz"):
        queue.write(m)
        assert [r.read() for r in readers] == [m, m]
    with pytest.raises(ValueError, match="reader 2 outside"):
        ShmBroadcast.attach(queue.handle, 2)
    for r in readers:
        r.close()
    queue.close()


def test_writer_raises_when_a_reader_is_gone() -> None:
    queue = ShmBroadcast.create(1, num_slots=2, slot_bytes=64)
    calls = []

    def check() -> None:
        calls.append(1)
        if len(calls) > 3:
            raise RuntimeError(f"reader gone (pid {os.getpid()} saw it)")

    queue.write(b"one")
    queue.write(b"two")  # both slots full, nobody reads
    with pytest.raises(RuntimeError, match="reader gone"):
        queue.write(b"three", check=check)
    queue.close()
