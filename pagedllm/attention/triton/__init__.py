"""The Triton attention backend (CUDA): `kernels` holds the @triton.jit kernels and their launch
wrappers, `backend` the `TritonAttention` implementation of `AttentionImpl`.

NOTE: importing this package does not import triton; `backend` and `kernels` do.
"""
