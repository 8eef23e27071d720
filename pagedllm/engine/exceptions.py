"""Errors the engine clients raise."""

from __future__ import annotations


class EngineDeadError(RuntimeError):
    """The engine-core process is gone (it crashed, was killed, or the client shut it down):
    no request can be served any more; the client must be rebuilt."""

    def __init__(self, message: str = "the engine-core process died") -> None:
        super().__init__(message)


class RequestFailedError(RuntimeError):
    """The engine could not run one request (the others go on); the message says why."""


class RequestPreparationError(RuntimeError):
    """The worker could not take one request into a step (its state was undone): the engine
    fails that request alone."""

    def __init__(self, request_id: str, cause: BaseException) -> None:
        super().__init__(f"{type(cause).__name__}: {cause}")
        self.request_id = request_id
