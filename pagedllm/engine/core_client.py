"""The client side of the engine-core process: start it, talk to it, watch it die.

`EngineCoreClient` spawns `run_engine_core` (core_proc.py), waits for its readiness message
(the model is loaded and the KV cache allocated), and owns both ends' sockets: it binds a PUSH
socket for inputs and a PULL socket for outputs on IPC paths in a private temp folder.

A monitor thread waits on the process's sentinel. If the process ends while the client did not
ask it to, the thread marks the client dead and pushes a DEAD message into the output socket
itself, so whoever awaits outputs wakes at once and fails every request.

NOTE: inputs go through a plain socket with no high-water mark, sent with NOBLOCK: a send only
queues the frame, so an abort can be sent from synchronous code (a generator's `finally`), and
nothing ever blocks the event loop, not even once the core is gone (a PUSH socket without a
peer would block a plain send forever: the frame is dropped instead). Outputs are awaited
through an asyncio shadow of the PULL socket. A request's frames are all encoded before the
first is sent, so one that cannot be encoded reaches the core not at all.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import shutil
import tempfile
import threading
import weakref
from multiprocessing.connection import Connection, wait
from multiprocessing.process import BaseProcess
from typing import Any

import zmq
import zmq.asyncio

from pagedllm.config import EngineConfig
from pagedllm.engine import serial
from pagedllm.engine.core_proc import STOP_SIGNAL, run_engine_core
from pagedllm.engine.request import Request

logger = logging.getLogger(__name__)

# How long shutdown() waits for the process to exit after STOP_SIGNAL before it kills it.
_SHUTDOWN_TIMEOUT_S = 5.0


class EngineCoreClient:
    def __init__(self, config: EngineConfig) -> None:
        self._tmpdir = tempfile.mkdtemp(prefix="pagedllm-core-")
        self.input_address = f"ipc://{self._tmpdir}/input"
        self.output_address = f"ipc://{self._tmpdir}/output"
        self.ctx = zmq.Context()
        self.input_socket = self.ctx.socket(zmq.PUSH)
        self.input_socket.setsockopt(zmq.SNDHWM, 0)
        self.input_socket.bind(self.input_address)
        self.output_socket = self.ctx.socket(zmq.PULL)
        self.output_socket.setsockopt(zmq.RCVHWM, 0)
        self.output_socket.bind(self.output_address)
        self._async_output: zmq.asyncio.Socket | None = None

        mp = multiprocessing.get_context("spawn")
        reader, writer = mp.Pipe(duplex=False)
        self.proc: BaseProcess = mp.Process(
            target=run_engine_core,
            args=(config, self.input_address, self.output_address, writer),
            name="pagedllm-EngineCore",
            # NOTE: not a daemon, so the core may start worker processes of its own later.
            daemon=False,
        )
        self.proc.start()
        writer.close()
        self._closing = threading.Event()
        self._finalizer = weakref.finalize(
            self, _cleanup, self.proc, self.ctx, self._tmpdir, self._closing
        )
        self._death = _Death()
        try:
            self.info = self._wait_ready(reader)
        except BaseException:
            self.shutdown()
            raise
        finally:
            reader.close()
        # NOTE: the thread holds no reference to the client, so a client dropped without
        # shutdown() is still collected and its finalizer stops the process.
        self._monitor = threading.Thread(
            target=_watch_process,
            args=(self.proc, self._closing, self.ctx, self.output_address, self._death),
            name="pagedllm-EngineCoreMonitor",
            daemon=True,
        )
        self._monitor.start()

    def _wait_ready(self, reader: Connection) -> dict[str, Any]:
        """Blocks until the core reports ready; raises its start-up error (ValueError for bad
        options, RuntimeError otherwise) or a RuntimeError if it died without a word."""
        wait([reader, self.proc.sentinel])
        message = None
        if reader.poll():
            try:
                message = reader.recv()
            except EOFError:
                message = None
        if message is not None and message[0] == "ready":
            return message[1]
        if message is not None and message[0] == "failed":
            error = message[1]
            error_cls = ValueError if error["type"] == "ValueError" else RuntimeError
            raise error_cls(f"the engine core failed to start: {error['type']}: {error['message']}")
        self.proc.join(_SHUTDOWN_TIMEOUT_S)
        raise RuntimeError(
            f"the engine-core process exited during start-up (exit code {self.proc.exitcode})"
        )

    @property
    def dead_reason(self) -> str | None:
        """Why the process died, once it died without being asked to."""
        return self._death.reason

    @property
    def is_dead(self) -> bool:
        return self.dead_reason is not None or self._closing.is_set()

    # ----- inputs -----

    def add_requests(self, requests: list[Request]) -> None:
        """Sends the requests (a user request's n samples) all or none: ValueError, with nothing
        sent, when one cannot be encoded."""
        try:
            frames = [serial.pack(serial.InputKind.ADD, serial.encode_request(r)) for r in requests]
        except (OverflowError, TypeError, ValueError, UnicodeError) as e:
            raise ValueError(f"the request cannot be sent to the engine: {e}") from e
        for frame in frames:
            self._send_frame(frame)

    def abort_requests(self, request_ids: list[str]) -> None:
        if request_ids:
            self._send_frame(serial.pack(serial.InputKind.ABORT, request_ids))

    def finish_requests(self, request_ids: list[str]) -> None:
        """Ends requests a stop string finished (the output processor saw it)."""
        if request_ids:
            self._send_frame(serial.pack(serial.InputKind.FINISH, request_ids))

    def _send_frame(self, frame: bytes) -> None:
        if self.is_dead:
            return
        try:
            self.input_socket.send(frame, zmq.NOBLOCK, copy=False)
        except zmq.Again:
            # NOTE: no peer: the core is gone; the monitor thread fails its requests.
            logger.warning("the engine core is gone: an input was dropped")
        except zmq.ZMQError as e:  # the context was closed under us (shutdown)
            logger.warning("an input to the engine core was dropped: %s", e)

    # ----- outputs -----

    async def get_output(self) -> tuple[int, Any]:
        """The next message from the core, `(serial.OutputKind, payload)`. Call it from one
        event loop at a time: the asyncio socket is bound to the loop that first awaits it."""
        if self._async_output is None:
            self._async_output = zmq.asyncio.Socket.from_socket(self.output_socket)
        frame = await self._async_output.recv(copy=False)
        return serial.unpack(frame.buffer)

    def reset_async(self) -> None:
        """Forgets the asyncio shadow socket (before awaiting outputs from another loop)."""
        self._async_output = None

    def shutdown(self) -> None:
        """Stops the process (STOP_SIGNAL, then SIGKILL), closes the sockets; idempotent."""
        self._finalizer()


class _Death:
    """What the monitor thread found: why the process died (None while it runs)."""

    reason: str | None = None


def _watch_process(
    proc: BaseProcess, closing: threading.Event, ctx: zmq.Context, address: str, death: _Death
) -> None:
    """Waits for the process to end; unless the client asked for it, records why and pushes a
    DEAD message to the output socket (wakes whoever awaits outputs)."""
    wait([proc.sentinel])
    proc.join()  # NOTE: reaps it (no zombie) and sets its exit code
    if closing.is_set():
        return
    death.reason = f"the engine-core process died (exit code {proc.exitcode})"
    logger.error(death.reason)
    try:  # the context may be closing under us
        sock = ctx.socket(zmq.PUSH)
        sock.connect(address)
        sock.send(serial.pack(serial.OutputKind.DEAD, death.reason))
        sock.close(linger=1000)
    except zmq.ZMQError:
        pass


def _cleanup(proc: BaseProcess, ctx: zmq.Context, tmpdir: str, closing: threading.Event) -> None:
    closing.set()
    if proc.is_alive() and proc.pid is not None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, STOP_SIGNAL)
        proc.join(_SHUTDOWN_TIMEOUT_S)
        if proc.is_alive():
            proc.kill()
            proc.join()
    ctx.destroy(linger=0)
    shutil.rmtree(tmpdir, ignore_errors=True)
