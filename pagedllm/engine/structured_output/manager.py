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
"""

from __future__ import annotations

import logging
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
        backend = self.backend
        bitmask = alloc(len(requests), backend.num_words)
        grammars, rows, maybe = [], [], []
        for i, request in enumerate(requests):
            so = None if request is None or request.is_finished else request.structured_output
            if so is not None and so.masks:
                grammars.append(so.grammar)
                rows.append(i)
                if so.phase == "maybe":
                    maybe.append((i, so))
            else:
                bitmask[i] = -1  # every token
        if grammars:
            backend.fill_bitmask(grammars, bitmask, rows)
        for i, so in maybe:
            so.allow_reasoning_start(bitmask[i])
        return bitmask

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
