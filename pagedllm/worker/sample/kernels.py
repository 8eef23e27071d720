"""One pass over the logits that picks every row's token: Gumbel-max sampling, or the argmax.

A row sampled at temperature T takes `argmax_v(x_v / T + G_v)` with `G_v` standard Gumbel noise,
which is distributed as softmax(x / T) (the Gumbel-max trick: the same exponential race as
`ops.random_sample`, in log space). Computing the noise in the kernel, from a counter-based
hash of (the row's 64-bit key, v), leaves one read of the logits in their own dtype: no fp32
copy, no softmax, no [rows, vocab] noise tensor, no division. A greedy row (T = 0) takes
`argmax_v(x_v)`: the same kernel without noise, so all-greedy and mixed batches need no other path.

Each program reduces a chunk of one row's vocabulary (grid `(rows, chunks)`; chunks chosen so
that a few rows still spread over the whole GPU) to its best (score, index); a tiny torch finish
picks each row's best chunk. Both steps keep the first maximum, so the index is `torch.argmax`'s
(ties go to the lowest index).

The noise of entry v of a row keyed `key` (64 bits, from the host: `SamplingRNG.sample_keys`):
`h = lowbias32(lowbias32(v ^ key_lo) ^ key_hi)` (two rounds of a 32-bit multiply-xorshift
finalizer), `w = ((h >> 8) | 1) * 2^-24` (odd multiples of 2^-24: exact, in (0, 1)),
`E = -ln(1 - w) ~ Exp(1)` and `G = -log2(E)`. Scores are in log2 units, `x * log2(e) / T + G`,
the natural ones times log2(e) plus a constant: the same argmax. A seeded request's key depends
only on (its seed, its output position), so its draws do not depend on the batch around it, on
preemption or on async scheduling; tests mirror the noise in numpy and compare token for token.
NOTE: w has 23 random bits, so E >= 2^-24 and G lies in [-4.1, 24] (natural units: [-2.8, 16.6]):
a token whose x / T is more than ~19.4 below the row's best never wins (its probability is below
e^-19.4 = 4e-9 of the best's), and draws of tokens below ~1e-6 of the best are coarse (as with
torch's `exponential_`, whose uniforms also have 24 bits). The hash is statistical, not
cryptographic.
NOTE: scores are compared in fp32; an exact tie between two sampled scores (negligible odds) goes
to the lower index. NaN logits never win (torch's argmax would pick them).
NOTE: compiled, the GPU's `lg2.approx` and FMA contractions round differently from the
interpreter's numpy, so a GPU draw can differ from the tests' mirror where two scores are within
about 1e-6 of each other. The variants for each logits dtype compute the noise and the score
with the same instructions (the sm_90 PTX), so a seeded draw does not depend on the dtype read.

NOTE: the loads are 16-byte vectors only when the vocabulary, the row stride and the chunk size
are multiples of 16 (Triton specializes on that: checked in the sm_90 PTX); otherwise they are
scalar (slower, still correct). qwen3's 151936, llama3's 128256 and SmolLM2's 49152 qualify.

The launch reads nothing on the device from the host (grid sizes come from shapes) and
allocates only its small outputs, so it can run inside a CUDA graph. Imported only when used
(CUDA); tests run it on CPU tensors under Triton's interpreter (`TRITON_INTERPRET=1` set before
this module is imported).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

# Launch defaults (sweep them with `python -m pagedllm.benchmarks.sampler`): a program's chunk is
# at least MIN_CHUNK entries; rows x chunks aims at TARGET_PROGRAMS (several per SM of an H100 or
# H200) while each chunk stays that long; BLOCK entries are loaded per loop step.
BLOCK = 1024
MIN_CHUNK = 4096
TARGET_PROGRAMS = 1024
NUM_WARPS = 4
DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@triton.jit
def _lowbias32(x):
    """A 32-bit multiply-xorshift finalizer (Chris Wellons' `lowbias32`): a bijection of uint32
    whose output bits each depend on every input bit."""
    x ^= x >> 16
    x *= 0x7FEB352D
    x ^= x >> 15
    x *= 0x846CA68B
    x ^= x >> 16
    return x


@triton.jit
def _log2(x, FAST: tl.constexpr):
    """log2; FAST: the GPU's `lg2.approx` (libdevice's precise log2 is a dozen FMAs, and two per
    entry would make the kernel compute-bound; the interpreter has no libdevice)."""
    if FAST:
        return libdevice.fast_log2f(x)
    else:
        return tl.log2(x)


@triton.jit
def _gumbel(idx, key_lo, key_hi, FAST_LOG: tl.constexpr):
    """Gumbel noise in log2 units (`-log2(E)`, E ~ Exp(1) up to a constant factor) of the
    entries `idx` of the row keyed (key_lo, key_hi)."""
    return -_log2(_exponential(idx, key_lo, key_hi, FAST_LOG), FAST_LOG)


@triton.jit
def _exponential(idx, key_lo, key_hi, FAST_LOG: tl.constexpr):
    """E ~ Exp(1) of the entries `idx` of the row keyed (key_lo, key_hi) (also read by
    `rejection_kernels`)."""
    h = _lowbias32(_lowbias32(idx.to(tl.uint32) ^ key_lo) ^ key_hi)
    w = ((h >> 8) | 1).to(tl.float32) * 5.9604644775390625e-08  # 2^-24: w in (0, 1)
    # E = -ln(1 - w). Near w = 0 (the draws that win) a log of 1 - w would lose E's digits
    # (lg2.approx's error is absolute, 2^-22.6): a series (relative error < 2^-26 below 2^-4).
    series = w * (1.0 + w * (0.5 + w * (0.33333334 + w * (0.25 + w * (0.2 + w * 0.16666667)))))
    return tl.where(w < 0.0625, series, _log2(1.0 - w, FAST_LOG) * -0.6931471805599453)


@triton.jit(do_not_specialize=["num_chunks"])  # one compile per dtype, whatever the row count
def _sample_kernel(
    logits_ptr,
    inv_temp_ptr,
    keys_ptr,
    mask_ptr,
    mask_index_ptr,
    score_ptr,
    index_ptr,
    vocab,
    stride_row,
    mask_stride,
    chunk_size,
    num_chunks,
    SAMPLE: tl.constexpr,
    MASKED: tl.constexpr,
    BLOCK: tl.constexpr,
    FAST_LOG: tl.constexpr,
):
    row = tl.program_id(0)
    chunk = tl.program_id(1)
    start = chunk * chunk_size
    end = tl.minimum(start + chunk_size, vocab)
    row_ptr = logits_ptr + row.to(tl.int64) * stride_row
    lanes = tl.arange(0, BLOCK)
    if MASKED:
        mask_row = tl.load(mask_index_ptr + row)  # the row's bitmask row, or -1: unmasked
        words_ptr = mask_ptr + tl.maximum(mask_row, 0).to(tl.int64) * mask_stride
    if SAMPLE:
        inv_temp = tl.load(inv_temp_ptr + row)
        noisy = inv_temp != 0.0  # else a greedy row
        scale = inv_temp * 1.4426950408889634  # log2(e): the scores are in log2 units
        key = tl.load(keys_ptr + row)
        key_lo = (key & 0xFFFFFFFF).to(tl.uint32)
        key_hi = ((key >> 32) & 0xFFFFFFFF).to(tl.uint32)
    # Per lane: the best score so far and its index; a lane starts at its first index, so a
    # chunk of -inf entries reports its first one.
    best = tl.full([BLOCK], float("-inf"), tl.float32)
    best_idx = start + lanes
    for off in range(start, end, BLOCK):
        idx = off + lanes
        x = tl.load(row_ptr + idx, mask=idx < end, other=float("-inf")).to(tl.float32)
        if MASKED:  # noqa: SIM102 (as below)
            if mask_row >= 0:  # the grammar's bitmask: bit idx % 32 of word idx // 32
                word = tl.load(words_ptr + idx // 32, mask=idx < end, other=0)
                x = tl.where(((word >> (idx % 32)) & 1) != 0, x, float("-inf"))
        score = x
        if SAMPLE:  # noqa: SIM102 (`noisy` exists only with SAMPLE; Triton's `and` needs both)
            if noisy:
                score = x * scale + _gumbel(idx, key_lo, key_hi, FAST_LOG)
        better = score > best  # NOTE: strict, so each lane keeps its first maximum
        best = tl.where(better, score, best)
        best_idx = tl.where(better, idx, best_idx)
    top = tl.max(best, axis=0)
    first = tl.min(tl.where(best == top, best_idx, vocab), axis=0)
    out = row * num_chunks + chunk
    tl.store(score_ptr + out, top)
    tl.store(index_ptr + out, first.to(tl.int64))


def chunking(
    rows: int, vocab: int, chunk_size: int | None = None, block: int = BLOCK
) -> tuple[int, int]:
    """(number of chunks, entries per chunk) of each row: `chunk_size` if given, else about
    TARGET_PROGRAMS programs in all with chunks of at least MIN_CHUNK, rounded up to `block`."""
    if chunk_size is None:
        chunks = max(1, min(triton.cdiv(TARGET_PROGRAMS, max(rows, 1)), vocab // MIN_CHUNK))
        chunk_size = triton.cdiv(triton.cdiv(vocab, chunks), block) * block
    return triton.cdiv(vocab, chunk_size), chunk_size


def sample_rows(
    logits: torch.Tensor,
    inv_temperature: torch.Tensor | None = None,
    keys: torch.Tensor | None = None,
    *,
    bitmask: torch.Tensor | None = None,
    bitmask_index: torch.Tensor | None = None,
    chunk_size: int | None = None,
    block: int = BLOCK,
    num_warps: int = NUM_WARPS,
) -> torch.Tensor:
    """One token id per row of `logits [R, V]` (fp16/bf16/fp32, unit stride over V), int64 [R].

    `inv_temperature` (fp32 [R]: 1 / T, or 0 for a greedy row) and `keys` (int64 [R], the rows'
    noise keys) are both given, or both None: every row greedy (exactly `logits.argmax(-1)`,
    barring NaN). A row whose entries are all -inf gets id 0; otherwise -inf entries never win.

    `bitmask` (int32 [M, ceil(V / 32)], xgrammar's layout: a grammar's allowed tokens) and
    `bitmask_index` (int32 [R]: row r reads bitmask row `bitmask_index[r]`, or none if -1): the
    forbidden tokens of a masked row are -inf, read in the same pass (as `ops.apply_token_bitmask`
    would set them, without writing the logits).
    """
    if logits.dim() != 2 or logits.dtype not in DTYPES or logits.stride(1) != 1:
        raise ValueError(
            f"sample_rows needs [rows, vocab] logits of {DTYPES} with unit stride, got "
            f"{tuple(logits.shape)} {logits.dtype} strides {logits.stride()}"
        )
    sample = inv_temperature is not None
    if sample != (keys is not None):
        raise ValueError("sample_rows: give both inv_temperature and keys, or neither")
    rows, vocab = logits.shape
    if rows == 0:
        return torch.empty(0, dtype=torch.int64, device=logits.device)
    if sample:
        assert inv_temperature is not None and keys is not None
        if inv_temperature.shape != (rows,) or inv_temperature.dtype != torch.float32:
            raise ValueError(f"inv_temperature must be float32 [{rows}]")
        if keys.shape != (rows,) or keys.dtype != torch.int64:
            raise ValueError(f"keys must be int64 [{rows}]")
    masked = bitmask is not None
    if masked != (bitmask_index is not None):
        raise ValueError("sample_rows: give both bitmask and bitmask_index, or neither")
    if masked:
        assert bitmask is not None and bitmask_index is not None
        words = triton.cdiv(vocab, 32)
        if bitmask.dim() != 2 or bitmask.dtype != torch.int32 or bitmask.shape[1] != words:
            raise ValueError(f"bitmask must be int32 [rows, {words}], got {tuple(bitmask.shape)}")
        if bitmask.stride(1) != 1:
            bitmask = bitmask.contiguous()
        if bitmask_index.shape != (rows,) or bitmask_index.dtype != torch.int32:
            raise ValueError(f"bitmask_index must be int32 [{rows}]")
    num_chunks, chunk = chunking(rows, vocab, chunk_size, block)
    scores = torch.empty(rows, num_chunks, dtype=torch.float32, device=logits.device)
    indices = torch.empty(rows, num_chunks, dtype=torch.int64, device=logits.device)
    dummy = scores  # never read when SAMPLE (MASKED) is off
    _sample_kernel[(rows, num_chunks)](
        logits,
        inv_temperature if sample else dummy,
        keys if sample else dummy,
        bitmask if masked else dummy,
        bitmask_index if masked else dummy,
        scores,
        indices,
        vocab,
        logits.stride(0),
        bitmask.stride(0) if bitmask is not None else 0,
        chunk,
        num_chunks,
        SAMPLE=sample,
        MASKED=masked,
        BLOCK=block,
        FAST_LOG=logits.is_cuda,
        num_warps=num_warps,
    )
    if num_chunks == 1:
        return indices[:, 0]
    # NOTE: argmax keeps the first best chunk, so the row's first maximum.
    return indices.gather(1, scores.argmax(dim=1, keepdim=True)).squeeze(1)


def warm_up(logits: torch.Tensor) -> None:
    """Compiles the kernel's variants for `logits`' dtype and fp32 (processed logits), greedy
    and sampling, and with a bitmask for `logits`' dtype, so that no request waits for Triton's
    JIT."""
    rows = logits.shape[0]
    inv_temp = torch.ones(rows, dtype=torch.float32, device=logits.device)
    keys = torch.zeros(rows, dtype=torch.int64, device=logits.device)
    for x in dict.fromkeys((logits, logits.float())):
        sample_rows(x)
        sample_rows(x, inv_temp, keys)
    # A grammar's bitmask is read in the pass when nothing else processes the logits.
    bitmask = torch.full((1, triton.cdiv(logits.shape[1], 32)), -1, dtype=torch.int32)
    bitmask = bitmask.to(logits.device)
    index = torch.zeros(rows, dtype=torch.int32, device=logits.device)
    sample_rows(logits, bitmask=bitmask, bitmask_index=index)
    sample_rows(logits, inv_temp, keys, bitmask=bitmask, bitmask_index=index)
