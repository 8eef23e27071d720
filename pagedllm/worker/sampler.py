"""The sampler: logits of the rows that sample → token ids, and their logprobs.

All rows of a step are sampled together, each with its own parameters, as whole-batch tensor ops
(no loop over requests, except one generator call per seeded row). The order is vLLM's:

  raw logprobs (log_softmax of the raw logits, kept for the logprobs output)
  → allowed_token_ids → banned tokens (bad words, stop tokens before min_tokens) → logit_bias
  → repetition / frequency / presence penalties → greedy argmax
  → temperature → min_p → top-k → top-p → random sample (the exponential race).

On CUDA the ids come from one Triton pass over the logits (`sample_kernels.sample_rows`: the
argmax, or Gumbel-max with noise hashed from per-row keys), which reads the model's bf16 logits
when no row needs them processed or their logprobs (no fp32 copy); rows with min_p, top-k or
top-p are masked by the torch ops first. The CPU keeps the torch ops and torch generators (the
kernel runs there only under Triton's interpreter, for tests).

NOTE: everything stays on the device; the caller brings back only the ids and their logprobs.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# Up to this many candidates, top-k + top-p sorts the top-k candidates instead of the vocabulary.
MAX_TOP_K_CANDIDATES = 1024


@dataclass
class TokenPairs:
    """A sparse [num_rows, vocab] matrix on the device: (row, token id[, value]) entries."""

    rows: torch.Tensor  # int64 [E]
    token_ids: torch.Tensor  # int64 [E]
    values: torch.Tensor | None = None  # float32 [E]


@dataclass
class Penalties:
    """The rows with a penalty, their parameters, and their tokens so far (padded)."""

    rows: torch.Tensor  # int64 [P]: indices into the sampled rows
    presence: torch.Tensor  # float32 [P]
    frequency: torch.Tensor  # float32 [P]
    repetition: torch.Tensor  # float32 [P]
    token_ids: torch.Tensor  # int64 [P, L]: prompt then output tokens
    prompt_mask: torch.Tensor  # bool [P, L]
    output_mask: torch.Tensor  # bool [P, L]


@dataclass
class SamplingMetadata:
    """Per-row sampling parameters of one step's sampled rows. Optional parts are None when no
    row uses them, so the sampler skips their work."""

    all_greedy: bool
    all_random: bool
    temperature: torch.Tensor | None = None  # float32 [R], 0 for greedy rows; None if all greedy
    top_k: torch.Tensor | None = None  # int64 [R], 0 = off
    max_top_k: int = 0  # largest top_k in use (the sampler needs it without a sync)
    top_k_in_all_rows: bool = False  # every row has a top_k <= MAX_TOP_K_CANDIDATES
    top_p: torch.Tensor | None = None  # float32 [R], 1 = off
    min_p: torch.Tensor | None = None  # float32 [R], 0 = off
    generator: torch.Generator | None = None  # shared by the unseeded rows
    generators: dict[int, torch.Generator] = field(default_factory=dict)  # row → its own
    # The kernel path's (see `sample_kernels`): float32 [R] 1 / T, 0 for greedy rows (None: from
    # `temperature`), and int64 [R] noise keys (seeded rows: from (seed, output position)).
    inv_temperature: torch.Tensor | None = None
    sample_keys: torch.Tensor | None = None
    allowed: TokenPairs | None = None  # the allowed ids of the rows that restrict them
    allowed_rows: torch.Tensor | None = None  # int64: the rows that restrict them
    banned: TokenPairs | None = None
    logit_bias: TokenPairs | None = None
    penalties: Penalties | None = None
    max_num_logprobs: int | None = None  # None: no row asked for logprobs


@dataclass
class LogprobsTensors:
    """Per row: the chosen token then the top-N, their raw logprobs, and the chosen one's rank."""

    token_ids: torch.Tensor  # int64 [R, 1 + N]
    logprobs: torch.Tensor  # float32 [R, 1 + N]
    ranks: torch.Tensor  # int64 [R]


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # int64 [R]
    logprobs: LogprobsTensors | None  # None when no row asked for logprobs


def compute_logprobs(
    raw_logprobs: torch.Tensor, chosen: torch.Tensor, num_logprobs: int
) -> LogprobsTensors:
    """The chosen ids' logprobs and ranks, and the top-`num_logprobs` of each row."""
    chosen_lp = raw_logprobs.gather(1, chosen.unsqueeze(1))
    ranks = (raw_logprobs >= chosen_lp).sum(dim=-1)
    if num_logprobs > 0:
        top_lp, top_ids = raw_logprobs.topk(num_logprobs, dim=-1)
        ids = torch.cat([chosen.unsqueeze(1), top_ids], dim=1)
        lps = torch.cat([chosen_lp, top_lp], dim=1)
    else:
        ids, lps = chosen.unsqueeze(1), chosen_lp
    return LogprobsTensors(token_ids=ids, logprobs=lps, ranks=ranks)


def argmax_rows(x: torch.Tensor, chunked: bool | None = None) -> torch.Tensor:
    """`x.argmax(-1)` for `[R, V]`, faster on the GPU for a few long rows: torch reduces each row
    in one thread block (28 µs for one 128k-vocabulary row on an H200); here each row is cut into
    chunks reduced in parallel, then the best chunk is picked. The same index as `argmax` (the
    first maximum: `max` and `argmax` both return the first, chunks are in order).
    `chunked` forces the choice (tests); by default chunks on CUDA for at most 16 rows."""
    rows, vocab = x.shape
    chunks = next((c for c in (256, 128, 64, 32, 16) if vocab % c == 0), 1)
    if chunked is None:
        chunked = x.is_cuda and rows <= 16 and vocab >= 8192
    if not chunked or chunks == 1:
        return x.argmax(dim=-1)
    values, within = x.view(rows, chunks, vocab // chunks).max(dim=-1)
    best = values.argmax(dim=-1, keepdim=True)
    return (within.gather(1, best) + best * (vocab // chunks)).squeeze(1)


def random_sample(
    probs: torch.Tensor,
    generator: torch.Generator | None,
    generators: dict[int, torch.Generator],
) -> torch.Tensor:
    """Samples one id per row from `probs` without a host sync (the exponential race:
    argmax(p / E) with E ~ Exp(1) is distributed as p). A seeded row draws its noise from its
    own generator, so its samples do not depend on the other rows of the batch."""
    q = torch.empty_like(probs)
    if len(generators) != probs.shape[0]:
        _exponential_(q, generator)
    for i, gen in generators.items():
        _exponential_(q[i], gen)
    return argmax_rows(probs.div_(q))


def _exponential_(out: torch.Tensor, generator: torch.Generator | None) -> None:
    """Fills `out` with Exp(1) noise. On the CPU, -log(U) with U ~ Uniform[0, 1) is 4-5x faster
    than `exponential_` (U = 0 gives +inf, a weight of 0: harmless)."""
    if out.device.type == "cpu":
        out.uniform_(generator=generator).log_().neg_()
    else:
        out.exponential_(generator=generator)


def apply_penalties(logits: torch.Tensor, p: Penalties) -> None:
    """vLLM's penalties, in place: repetition over prompt and output tokens (divides positive
    logits, multiplies negative ones), frequency (× count) and presence over output tokens."""
    vocab = logits.shape[1]
    num_rows = p.rows.shape[0]
    out_idx = torch.where(p.output_mask, p.token_ids, vocab)
    counts = torch.zeros(num_rows, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, out_idx, torch.ones_like(out_idx, dtype=logits.dtype))
    counts = counts[:, :vocab]
    prompt_idx = torch.where(p.prompt_mask, p.token_ids, vocab)
    seen = torch.zeros(num_rows, vocab + 1, dtype=torch.bool, device=logits.device)
    seen.scatter_(1, prompt_idx, True)
    seen = seen[:, :vocab] | (counts > 0)
    sub = logits[p.rows]
    rep = p.repetition.unsqueeze(1)
    sub = torch.where(seen, torch.where(sub > 0, sub / rep, sub * rep), sub)
    sub -= p.frequency.unsqueeze(1) * counts
    sub -= p.presence.unsqueeze(1) * (counts > 0).to(sub.dtype)
    logits[p.rows] = sub


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Masks tokens whose probability is below min_p × the row's top probability."""
    probs = logits.softmax(dim=-1)
    threshold = probs.amax(dim=-1, keepdim=True) * min_p.unsqueeze(1)
    logits.masked_fill_(probs < threshold, float("-inf"))


def apply_top_k(logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int) -> None:
    """Keeps the tokens at least as likely as each row's k-th (rows with k = 0 keep all)."""
    max_top_k = min(max_top_k, logits.shape[1])
    k = top_k.clamp(min=1, max=max_top_k)
    threshold = logits.topk(max_top_k, dim=-1).values.gather(1, (k - 1).unsqueeze(1))
    threshold.masked_fill_((top_k == 0).unsqueeze(1), float("-inf"))
    logits.masked_fill_(logits < threshold, float("-inf"))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor
) -> torch.Tensor:
    """Top-k then top-p (keep the fewest top tokens whose probability reaches p), by one sort."""
    vocab = logits.shape[1]
    ascending, order = logits.sort(dim=-1)
    if top_k is not None:
        k = torch.where(top_k == 0, vocab, top_k).clamp(max=vocab)
        threshold = ascending.gather(1, (vocab - k).unsqueeze(1))
        ascending.masked_fill_(ascending < threshold, float("-inf"))
    cum = ascending.softmax(dim=-1).cumsum(dim=-1)
    drop = cum <= 1 - top_p.unsqueeze(1)
    drop[:, -1] = False  # NOTE: the most likely token always stays
    ascending.masked_fill_(drop, float("-inf"))
    return logits.scatter_(1, order, ascending)


def apply_top_k_top_p_candidates(
    logits: torch.Tensor, top_k: torch.Tensor, max_top_k: int, top_p: torch.Tensor
) -> torch.Tensor:
    """Top-k then top-p when every row has a top-k: only the `max_top_k` candidates are sorted
    (the vocabulary-wide sort of `apply_top_k_top_p` is the sampler's most expensive op).

    NOTE: a token tied with a row's k-th logit but ranked past `max_top_k` is dropped, where the
    full sort keeps it; the kept set is otherwise the same.
    """
    values, indices = logits.topk(max_top_k, dim=-1)
    kth = values.gather(1, (top_k.clamp(max=max_top_k) - 1).unsqueeze(1))
    values.masked_fill_(values < kth, float("-inf"))
    probs = values.softmax(dim=-1)
    mass_above = probs.cumsum(dim=-1) - probs
    values.masked_fill_(mass_above >= top_p.unsqueeze(1), float("-inf"))
    out = torch.full_like(logits, float("-inf"))
    return out.scatter_(1, indices, values)


def apply_filters(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
    """min_p, then top-k and top-p, on temperature-scaled logits (in place, or a new tensor)."""
    if md.min_p is not None:
        apply_min_p(logits, md.min_p)
    if md.top_p is not None and md.top_k is not None and md.top_k_in_all_rows:
        return apply_top_k_top_p_candidates(logits, md.top_k, md.max_top_k, md.top_p)
    if md.top_p is not None:
        return apply_top_k_top_p(logits, md.top_k, md.top_p)
    if md.top_k is not None:
        apply_top_k(logits, md.top_k, md.max_top_k)
    return logits


def _has_processors(md: SamplingMetadata) -> bool:
    return any(p is not None for p in (md.allowed, md.banned, md.logit_bias, md.penalties))


def _has_filters(md: SamplingMetadata) -> bool:
    return not md.all_greedy and any(p is not None for p in (md.min_p, md.top_k, md.top_p))


class Sampler:
    def __init__(self, use_kernel: bool | None = None) -> None:
        """`use_kernel`: pick the ids with `sample_kernels` (None: when the logits are on CUDA;
        True on the CPU needs Triton's interpreter, for tests)."""
        self.use_kernel = use_kernel

    def uses_kernel(self, device: torch.device) -> bool:
        """Whether ids on `device` come from `sample_kernels` (which needs the rows' keys)."""
        return device.type == "cuda" if self.use_kernel is None else self.use_kernel

    def __call__(self, logits: torch.Tensor, md: SamplingMetadata) -> SamplerOutput:
        kernel = self.uses_kernel(logits.device)
        # NOTE: the kernel reads any float dtype: it needs fp32 logits only when they change.
        if not kernel or _has_processors(md) or _has_filters(md) or md.max_num_logprobs is not None:
            logits = logits.float()
        raw_logprobs = None
        if md.max_num_logprobs is not None:
            raw_logprobs = logits.log_softmax(dim=-1)
        self._apply_logits_processors(logits, md)
        token_ids = self._sample_kernel(logits, md) if kernel else self._sample(logits, md)
        logprobs = None
        if raw_logprobs is not None:
            assert md.max_num_logprobs is not None
            logprobs = compute_logprobs(raw_logprobs, token_ids, md.max_num_logprobs)
        return SamplerOutput(token_ids=token_ids, logprobs=logprobs)

    @staticmethod
    def _apply_logits_processors(logits: torch.Tensor, md: SamplingMetadata) -> None:
        """The processors that can change the argmax, in place."""
        if md.allowed is not None:
            assert md.allowed_rows is not None
            mask = torch.zeros_like(logits, dtype=torch.bool)
            mask[md.allowed_rows] = True
            mask[md.allowed.rows, md.allowed.token_ids] = False
            logits.masked_fill_(mask, float("-inf"))
        if md.banned is not None:
            logits[md.banned.rows, md.banned.token_ids] = float("-inf")
        if md.logit_bias is not None:
            assert md.logit_bias.values is not None
            logits.index_put_(
                (md.logit_bias.rows, md.logit_bias.token_ids),
                md.logit_bias.values,
                accumulate=True,
            )
        if md.penalties is not None:
            apply_penalties(logits, md.penalties)

    @staticmethod
    def _sample(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        if md.all_greedy:
            return argmax_rows(logits)
        assert md.temperature is not None
        greedy_rows = md.temperature == 0
        greedy = None if md.all_random else argmax_rows(logits)
        logits.div_(torch.where(greedy_rows, 1.0, md.temperature).unsqueeze(1))
        logits = apply_filters(logits, md)
        sampled = random_sample(logits.softmax(dim=-1), md.generator, md.generators)
        return sampled if greedy is None else torch.where(greedy_rows, greedy, sampled)

    @staticmethod
    def _sample_kernel(logits: torch.Tensor, md: SamplingMetadata) -> torch.Tensor:
        """The ids from one pass of `sample_kernels.sample_rows`. Rows with min_p / top-k / top-p
        get the torch masks (on `logits` scaled by 1 / T, as `_sample`), and the kernel then draws
        from `logits` with the masked entries at -inf: a row without those parameters reads
        exactly the values it would read in a batch without them, so a seeded row's draw does
        not depend on its neighbours' parameters. Greedy rows read the unmasked logits."""
        from pagedllm.worker import sample_kernels

        if md.all_greedy:
            return sample_kernels.sample_rows(logits)
        assert md.temperature is not None
        assert md.sample_keys is not None, "the kernel path needs InputBatch's sample keys"
        inv_temp = md.inv_temperature
        if inv_temp is None:
            t = md.temperature
            inv_temp = torch.where(t == 0, 0.0, 1.0 / t.clamp_min(1e-30))
        if _has_filters(md):
            greedy_rows = inv_temp == 0
            scaled = logits * torch.where(greedy_rows, 1.0, inv_temp).unsqueeze(1)
            dropped = apply_filters(scaled, md).isneginf()
            if not md.all_random:
                dropped &= ~greedy_rows.unsqueeze(1)
            logits = logits.masked_fill(dropped, float("-inf"))
        return sample_kernels.sample_rows(logits, inv_temp, md.sample_keys)
