"""`StructuredOutputRequest`: one request's grammar, compiling and then matching."""

from __future__ import annotations

from concurrent.futures import Future
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagedllm.engine.structured_output.reasoning import ReasoningMarkers


class StructuredOutputRequest:
    """A request's grammar: a compile in flight (`future`), then its matcher (`grammar`), which
    the scheduler advances with each token it accepts for the request."""

    def __init__(self, future: Future[Any]) -> None:
        """`future`: the compile, whose result is (matcher, reasoning markers or None, whether
        the output starts inside the reasoning)."""
        self._future: Future[Any] | None = future
        self.grammar: Any | None = None  # the backend's matcher, once compiled
        self.error: str | None = None  # why it could not compile
        # While the model reasons (see reasoning.py) the grammar waits: no mask, no advance.
        # "answer" (the grammar applies), "reasoning", or "maybe" (the next token decides).
        self.reasoning_markers: ReasoningMarkers | None = None
        self.phase = "answer"

    @property
    def ready(self) -> bool:
        """Whether the compile has ended (then `grammar` or `error` is set). Never blocks."""
        future = self._future
        if future is None:
            return True
        if not future.done():
            return False
        self._future = None
        try:
            self.grammar, self.reasoning_markers, self.phase = future.result()
        except Exception as e:
            self.error = str(e) or type(e).__name__
        return True

    def wait(self, timeout: float | None = None) -> None:
        """Blocks until the compile ends (tests, and the engine's synchronous paths)."""
        if self._future is not None:
            self._future.exception(timeout)

    def accept(self, token_id: int, output_token_ids: list[int]) -> bool:
        """Advances the grammar by `token_id` (the last of `output_token_ids`); False when the
        grammar forbids it. While reasoning, the grammar waits for the end marker instead."""
        assert self.grammar is not None, "a request samples only once its grammar is ready"
        if self.phase == "answer":  # NOTE: first: once per token of every constrained row
            return self.grammar.accept_token(token_id)
        markers = self.reasoning_markers
        if self.phase == "maybe":
            assert markers is not None
            self.phase = "reasoning" if (token_id,) == markers.start_ids else "answer"
        if self.phase == "reasoning":
            assert markers is not None
            if markers.ends_with_end(output_token_ids):
                self.phase = "answer"
            return True
        return self.grammar.accept_token(token_id)

    @property
    def masks(self) -> bool:
        """Whether the grammar constrains the next token (compiled, not reasoning, not done)."""
        return self.grammar is not None and self.phase != "reasoning" and not self.is_terminated

    def allow_reasoning_start(self, bitmask_row: Any) -> None:
        """In phase "maybe", lets the start marker's token through the grammar's mask."""
        if self.phase == "maybe" and self.reasoning_markers is not None:
            import numpy as np

            (token,) = self.reasoning_markers.start_ids
            bitmask_row.view(np.uint32)[token // 32] |= np.uint32(1 << (token % 32))

    @property
    def is_terminated(self) -> bool:
        """The grammar is complete and took its stop token: the request ends."""
        return self.grammar is not None and self.grammar.is_terminated
