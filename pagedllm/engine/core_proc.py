"""The engine-core process: an `EngineCore` (scheduler + executor) behind two ZMQ sockets.

`run_engine_core` is the process's entry point (multiprocessing, spawn). It builds the core,
the executor and so torch included (the client process never imports them), reports readiness
(or the start-up error's text) on a pipe, then runs the busy loop:

    take every waiting input (new requests, aborts, stop-string finishes) → step() → send outputs

Inputs come on a PULL socket, outputs leave on a PUSH socket, each message one msgpack frame
(serial.py). With no unfinished request the loop blocks on the input socket (no busy spin),
waking once a second only to notice an orphaning parent. A message goes back after every step
(outputs, maybe none, with the scheduler's stats), and after inputs handled while idle, so the
client's gauges fall to zero once the last request is aborted.

NOTE: one thread does everything: socket I/O and (de)serialization are not overlapped with the
model step, as vLLM's I/O threads do; on a CPU the GIL would undo most of that gain.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import traceback
from multiprocessing.connection import Connection
from typing import Any

import zmq

from pagedllm.config import EngineConfig
from pagedllm.engine import serial
from pagedllm.engine.core import EngineCore
from pagedllm.engine.outputs import EngineCoreOutput, EngineCoreOutputs
from pagedllm.engine.request import FinishReason, RequestStatus
from pagedllm.executor import executor_class

logger = logging.getLogger(__name__)

# How often an idle core checks that its parent is still alive.
_IDLE_POLL_MS = 1000


class EngineCoreProc:
    """The busy loop around one EngineCore, fed and drained through ZMQ sockets."""

    def __init__(self, config: EngineConfig, input_address: str, output_address: str) -> None:
        self.ctx = zmq.Context()
        self.input_socket = self.ctx.socket(zmq.PULL)
        self.input_socket.connect(input_address)
        self.output_socket = self.ctx.socket(zmq.PUSH)
        self.output_socket.setsockopt(zmq.SNDHWM, 0)  # never drop or block on outputs
        self.output_socket.connect(output_address)
        self.core = EngineCore(config, executor_class(config)(config))
        # Outputs made outside a step (a rejected request), sent with the next message.
        self._pending: list[EngineCoreOutput] = []
        parent = multiprocessing.parent_process()
        self._parent_alive = parent.is_alive if parent is not None else (lambda: True)

    def run_busy_loop(self) -> None:
        while True:
            idle = not self.core.has_unfinished_requests()
            if not self._process_inputs(block=idle):
                return  # the parent is gone
            if self.core.has_unfinished_requests():
                outputs = self.core.step()
                self._send(outputs, self.core.step_queue_times)
            else:
                self._send([], {})  # inputs handled while idle: fresh gauges

    def _process_inputs(self, block: bool) -> bool:
        """Handles every input waiting; if `block`, waits for at least one. False once the
        parent process died (nobody will read the outputs)."""
        if block:
            while not self.input_socket.poll(_IDLE_POLL_MS):
                if not self._parent_alive():
                    return False
        while True:
            try:
                frame = self.input_socket.recv(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return True
            self._handle(*serial.unpack(frame.buffer))

    def _handle(self, kind: int, payload: Any) -> None:
        if kind == serial.InputKind.ADD:
            try:
                self.core.add_request(serial.decode_request(payload))
            except Exception as e:
                # NOTE: the client validated it; whatever still fails refuses this request alone.
                req_id = str(payload[0]) if isinstance(payload, list) and payload else "?"
                logger.warning("refused request %s: %s: %s", req_id, type(e).__name__, e)
                why = f"the engine refused the request: {type(e).__name__}: {e}"
                self._pending.append(
                    EngineCoreOutput(
                        request_id=req_id,
                        new_token_ids=[],
                        finish_reason=FinishReason.ERROR,
                        stop_reason=why,
                    )
                )
        elif kind == serial.InputKind.ABORT:
            self.core.abort_requests(payload)
        elif kind == serial.InputKind.FINISH:
            self.core.finish_requests(payload, RequestStatus.FINISHED_STOPPED)
        else:
            raise ValueError(f"unknown input kind {kind}")

    def _send(self, outputs: list[EngineCoreOutput], queue_times: dict[str, float]) -> None:
        if self._pending:
            outputs, self._pending = self._pending + outputs, []
        batch = EngineCoreOutputs(outputs, self.core.make_stats(), queue_times)
        self.output_socket.send(serial.encode_outputs(batch), copy=False)

    def send_failure(self, text: str) -> None:
        self.output_socket.send(serial.pack(serial.OutputKind.FAILED, text))

    def shutdown(self) -> None:
        try:
            self.core.shutdown()
        finally:
            self.ctx.destroy(linger=1000)  # lets a last FAILED message out


# The signal the client stops the process with (SIGTERM is ignored: see `run_engine_core`).
STOP_SIGNAL = signal.SIGUSR1


def _raise_system_exit(signum: int, frame: Any) -> None:
    raise SystemExit(0)


def run_engine_core(
    config: EngineConfig, input_address: str, output_address: str, ready: Connection
) -> None:
    """The engine-core process's entry point.

    Sends `("ready", info)` or `("failed", {"type", "message"})` (the start-up error) on `ready`.
    Ctrl-C and SIGTERM are left to the parent: both also reach this process when sent to the
    whole process group, and a server drains its requests before it stops the core. The client
    stops it with `STOP_SIGNAL`; it also exits when the parent is gone.
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(STOP_SIGNAL, _raise_system_exit)
    if config.device_config.device == "cpu":
        # NOTE: OpenMP threads that spin between the model's ops take the cores the client
        # process needs to detokenize and stream; idle ones must sleep (3x faster end to end
        # on 2 cores). Set before torch loads; a user's own setting wins.
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        proc = EngineCoreProc(config, input_address, output_address)
    except BaseException as e:
        ready.send(("failed", {"type": type(e).__name__, "message": str(e)}))
        ready.close()
        raise SystemExit(1) from None
    ready.send(("ready", {"num_blocks": proc.core.num_blocks}))
    ready.close()
    try:
        proc.run_busy_loop()
    except SystemExit:
        pass
    except BaseException as e:
        logger.exception("the engine core failed")
        proc.send_failure(f"{type(e).__name__}: {e}\n{traceback.format_exc()}")
        raise SystemExit(1) from None
    finally:
        proc.shutdown()
