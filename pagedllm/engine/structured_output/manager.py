"""`StructuredOutputManager`: grammars compiled off the step loop, bitmasks filled per step.

The engine core owns one. `init_request` starts compiling a constrained request's grammar in
a thread pool and attaches a `StructuredOutputRequest` to it; the scheduler leaves the request
waiting until the compile is done (a running request never waits for another's compile), and
fails it (finish reason "error") if the compile failed. The backend (xgrammar) and the
tokenizer it needs are made on the first constrained request, in the pool too.

`grammar_bitmask(requests, alloc)`: the int32 [rows, ceil(vocab / 32)] mask of a step's constrained
rows, in the order given (a row of all ones for a request that has ended). The core calls it
after the step's forward is queued on the device and the previous step's tokens have advanced
the matchers, so it runs on the host while the device computes (see EngineCore).
`fill_in_background` runs xgrammar's fill in a thread of its own (it releases the GIL): the
async core starts it as soon as the matchers are current and takes the mask when it queues the
sampling, so the fill overlaps the host's work on the step's outputs.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from typing import TYPE_CHECKING, Any

from pagedllm.engine.structured_output.reasoning import ReasoningMarkers
from pagedllm.engine.structured_output.request import StructuredOutputRequest

if TYPE_CHECKING:
    import numpy as np

    from pagedllm.config import ModelConfig
    from pagedllm.engine.request import Request
    from pagedllm.sampling_params import StructuredOutputsParams

logger = logging.getLogger(__name__)

# Threads compiling grammars (xgrammar compiles with its own threads inside each).
NUM_COMPILE_WORKERS = 2
# The interpreter's switch interval while a bitmask is filled in the background (see `_fill`).
FILL_SWITCH_INTERVAL_S = 0.0001


class BitmaskFill:
    """A step's bitmask being filled; `result()` waits for it (re-raising the fill's error)
    and finishes the rows of requests that may start reasoning."""

    def __init__(self, bitmask: np.ndarray, maybe: list[tuple[int, StructuredOutputRequest]]):
        self.bitmask = bitmask
        self.future: Future[Any] | None = None
        self._maybe = maybe

    def result(self) -> np.ndarray:
        if self.future is not None:
            self.future.result()
        for i, so in self._maybe:
            so.allow_reasoning_start(self.bitmask[i])
        return self.bitmask

    def wait(self) -> None:
        """Waits for the fill to end, raising nothing (its buffer may be reused after)."""
        if self.future is not None:
            self.future.exception()


class StructuredOutputManager:
    def __init__(
        self,
        model_config: ModelConfig,
        tokenizer: Any | None = None,
        reasoning_parser: str | None = None,
    ) -> None:
        """`tokenizer`: the model's (None: loaded from `model_config.tokenizer` when the first
        constrained request comes). `reasoning_parser`: the model reasons first (reasoning.py)."""
        self.model_config = model_config
        self._tokenizer = tokenizer
        self.reasoning_parser = reasoning_parser
        self._markers: ReasoningMarkers | None = None
        self._backend: Any | None = None
        self._backend_lock = threading.Lock()
        self._pool: ThreadPoolExecutor | None = None
        self._compiling: set[Future[Any]] = set()
        self._filler: ThreadPoolExecutor | None = None

    @property
    def backend(self) -> Any:
        """The grammar backend (made once, on first use: it reads the whole vocabulary)."""
        with self._backend_lock:
            if self._backend is None:
                from pagedllm.engine.structured_output.backends.xgrammar import XgrammarBackend

                tokenizer = self._tokenizer
                if tokenizer is None:
                    from pagedllm.transformers_utils.tokenizer import get_tokenizer

                    tokenizer = get_tokenizer(self.model_config.tokenizer)
                if tokenizer is None:
                    raise ValueError("structured output needs the model's tokenizer; it has none")
                mc = self.model_config
                self._backend = XgrammarBackend(tokenizer, mc.vocab_size, list(mc.eos_token_ids))
                if self.reasoning_parser is not None:
                    self._markers = ReasoningMarkers(self.reasoning_parser, tokenizer)
            return self._backend

    def _compile(self, spec: StructuredOutputsParams) -> Any:
        backend = self.backend
        return backend.new_matcher(backend.compile(spec))

    def _prepare(
        self, spec: StructuredOutputsParams, prompt_token_ids: list[int]
    ) -> tuple[Any, ReasoningMarkers | None, str]:
        """(matcher, reasoning markers, how the output begins: reasoning.py), in the pool."""
        grammar = self._compile(spec)
        markers = self._markers
        phase = "answer" if markers is None else markers.initial_state(prompt_token_ids)
        return grammar, markers, phase

    def init_request(self, request: Request) -> None:
        """Starts compiling the request's grammar, if it has a constraint."""
        spec = request.sampling_params.structured_outputs
        if spec is None:
            return
        if self._pool is None:
            self._pool = ThreadPoolExecutor(NUM_COMPILE_WORKERS, "pagedllm-grammar")
        future = self._pool.submit(self._prepare, spec, request.prompt_token_ids)
        self._compiling.add(future)
        future.add_done_callback(self._compiling.discard)
        request.structured_output = StructuredOutputRequest(future)

    def wait_for_compiles(self, timeout: float) -> None:
        """Blocks until a grammar in flight is compiled, or `timeout` seconds: the core's loop
        waits here, not spinning (a spinning loop would hold the GIL the compile needs), when
        nothing else can run."""
        pending = list(self._compiling)
        if pending:
            wait(pending, timeout, return_when=FIRST_COMPLETED)

    def grammar_bitmask(
        self, requests: list[Request | None], alloc: Callable[[int, int], np.ndarray]
    ) -> np.ndarray:
        """The next-token bitmask of each request's grammar, one row each in the given order
        (all ones for None, an ended request or a finished grammar), filled into
        `alloc(rows, words)`: the worker's int32 buffer (pinned on CUDA, so the mask needs no
        copy on the host)."""
        return self._fill(requests, alloc, background=False).result()

    def fill_in_background(
        self, requests: list[Request | None], alloc: Callable[[int, int], np.ndarray]
    ) -> BitmaskFill:
        """`grammar_bitmask` with xgrammar's fill in a thread; `.result()` gives the mask. The
        requests' matchers must not advance until then (the core collects no step between)."""
        return self._fill(requests, alloc, background=True)

    def _fill(
        self,
        requests: list[Request | None],
        alloc: Callable[[int, int], np.ndarray],
        background: bool,
    ) -> BitmaskFill:
        """Everything but xgrammar's fill runs here, in the caller's thread (the buffer, the
        rows to fill, the all-ones rows): the thread only calls into C++ (no Python of its own
        to contend for the GIL with the caller's)."""
        backend = self.backend
        bitmask = alloc(len(requests), backend.num_words)
        matchers, rows, maybe = [], [], []
        for i, request in enumerate(requests):
            so = None if request is None or request.is_finished else request.structured_output
            if so is not None and so.masks and so.grammar is not None:
                matchers.append(so.grammar.matcher)
                rows.append(i)
                if so.phase == "maybe":
                    maybe.append((i, so))
            else:
                bitmask[i] = -1  # every token
        fill = BitmaskFill(bitmask, maybe)
        if not matchers:
            return fill
        if not background:
            backend.fill_bitmask(matchers, bitmask, rows)
            return fill
        if self._filler is None:
            self._filler = ThreadPoolExecutor(1, "pagedllm-bitmask")
        # NOTE: the thread needs the GIL twice (to call in, to return), and a thread asking
        # for it waits for the holder's switch interval (5 ms by default) while the caller
        # runs Python: the fill would end after the caller's work instead of beside it.
        # A short interval while the fill is in flight bounds that wait.
        previous = sys.getswitchinterval()
        sys.setswitchinterval(FILL_SWITCH_INTERVAL_S)
        fill.future = self._filler.submit(backend.fill_bitmask, matchers, bitmask, rows)
        fill.future.add_done_callback(lambda _: sys.setswitchinterval(previous))
        return fill

    def shutdown(self) -> None:
        if self._filler is not None:
            self._filler.shutdown(wait=True)
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
