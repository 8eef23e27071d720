"""Structured output: requests whose output must follow a JSON schema, a regex, a choice or a
grammar (`SamplingParams.structured_outputs`).

- `manager.py`: `StructuredOutputManager` (owned by the engine core): compiles each request's
  grammar in a thread (a request waits in the scheduler until it is ready), and fills the token
  bitmask of a step's constrained rows while the device runs the step's forward;
- `request.py`: `StructuredOutputRequest`, a request's grammar (compiling, then its matcher),
  which the scheduler advances with every accepted token;
- `backends/`: the grammar engines (xgrammar).
"""

from pagedllm.engine.structured_output.manager import StructuredOutputManager
from pagedllm.engine.structured_output.request import StructuredOutputRequest

__all__ = ["StructuredOutputManager", "StructuredOutputRequest"]
