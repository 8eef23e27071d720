"""Grammar backends of structured output: each compiles a `StructuredOutputsParams` into a
grammar and makes matchers over it. Only xgrammar today (`xgrammar.py`)."""
