"""The engine: scheduler, KV block pool, request lifecycle. Plain Python, no torch.

NOTE: nothing in this package imports torch or transformers at module level; the pieces that need
them (the executor, the tokenizer) are imported inside the functions that build them.
"""
