"""The draft model of speculative decoding (method "draft_model"): a smaller model with the
target's vocabulary that the worker runs after each step to propose the next step's drafts.

KV cache: each attention layer of the draft gets its own cache tensor of the target's
`num_blocks` (the worker allocates them with the target's, under names "draft.<layer>", and
counts their bytes in every block) and shares the target's block table: block b of a request
holds the draft's K/V of the same positions in the draft's tensors. So the scheduler's blocks
are the draft's too, and freeing, preemption and the prefix cache need nothing more; the
scheduler reserves `num_speculative_tokens` slots past each step's tokens for the draft's own
positions (`Scheduler.num_lookahead`), and a draft is never longer than the slots its request
holds allow (nor past max_model_len).

Per request the proposer keeps how many leading positions hold the draft's K/V (`_computed`),
0 for a request new to the batch (or resumed): it never trusts content that another request's
draft may have left in a prefix-cache block. After a step that sampled a request with n known
tokens, the draft runs
1. a catch-up forward over its tokens [computed, n) (the whole prompt the first time, then the
   tokens the last verification emitted), whose last row gives d_1;
2. k - 1 forwards of one token each (d_j at position n + j - 1), giving d_{j+1};
and `computed` becomes n (its K/V at n.. are draft tokens, written again next time). Greedy
requests take the draft's argmax (a deterministic draft); sampled ones draw d_j from the
draft's distribution q_j after their temperature and filters, and q is kept (fp32 [k, V]) for
the rejection sampler's min(1, p / q) rule (`draft_probs`). A seeded request draws from
generators keyed by its seed and output position, so its drafts do not depend on the batch.

NOTE: each draft forward brings its tokens to the host (one sync per forward): the proposals
are written into the input batch, whose rows the next forward reads.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from pagedllm.attention.backend import AttentionBackend, AttentionMetadata, StepAttentionInputs
from pagedllm.attention.layer import Attention
from pagedllm.config import EngineConfig
from pagedllm.forward_context import set_forward_context
from pagedllm.utils import cdiv
from pagedllm.worker.input_batch import InputBatch
from pagedllm.worker.sample import Sampler
from pagedllm.worker.sample.ops import argmax_rows
from pagedllm.worker.sample.rejection import MASK63, DraftLayout, target_probs
from pagedllm.worker.sample.rng import SamplingRNG
from pagedllm.worker.staging import HostStager

# Added to a seeded request's output position for its draft draws' keys (draft j: (j + 1)
# times it), so they never coincide with the keys of its own sampling and verification.
_DRAFT_KEY_STRIDE = 1 << 40


def make_drafter(
    config: EngineConfig,
    device: torch.device,
    attn_backend: type[AttentionBackend],
    target: Any = None,
) -> DraftModel | None:
    """The worker's proposer of the config: the draft model ("draft_model"), the EAGLE head
    of the `target` ("eagle", "eagle3": `worker/eagle.py`); None for the other methods."""
    spec = config.speculative_config
    if spec is not None and spec.method in ("eagle", "eagle3"):
        from pagedllm.worker.eagle import EagleProposer

        assert target is not None, "an EAGLE head reads the target's hidden states"
        return EagleProposer(config, device, attn_backend, target)
    if spec is None or spec.method != "draft_model":
        return None
    return DraftModel(config, device, attn_backend)


class DraftModel:
    def __init__(
        self, config: EngineConfig, device: torch.device, attn_backend: type[AttentionBackend]
    ) -> None:
        from pagedllm.loader import load_model

        spec = config.speculative_config
        assert spec is not None and spec.draft_model_config is not None
        self.k = spec.num_speculative_tokens
        self.device = device
        self.block_size = config.cache_config.block_size
        self.max_model_len = config.model_config.max_model_len
        self.max_forward_tokens = config.scheduler_config.max_num_batched_tokens
        self.model = load_model(
            spec.draft_model_config,
            str(device),
            attn_backend,
            config.kernel_config,
            config.parallel_config,
        )
        # NOTE: its own builder: a target step's metadata buffers are never shared.
        self.attn_builder = attn_backend.get_builder_cls()(device, self.max_model_len)
        self.attention_layers = {
            f"draft.{name}": m for name, m in self.model.named_modules() if isinstance(m, Attention)
        }
        self._computed: dict[str, int] = {}
        # Sampled requests' drafts: (num_tokens when proposed, the drafts, q fp32 [k, V]).
        self._probs: dict[str, tuple[int, list[int], torch.Tensor]] = {}
        self.batch: InputBatch | None = None
        self.stager: HostStager | None = None
        self.sampler: Sampler | None = None

    def bind(self, batch: InputBatch, stager: HostStager, sampler: Sampler) -> None:
        """The runner's input batch (tokens, block tables, sampling columns), stager and
        sampler (its RNG), which the proposals read."""
        self.batch, self.stager, self.sampler = batch, stager, sampler

    def remove_request(self, req_id: str) -> None:
        """A request left the batch (ended, or preempted: its blocks are new when it resumes)."""
        self._computed.pop(req_id, None)
        self._probs.pop(req_id, None)

    # ----- proposing -----

    @torch.inference_mode()
    def propose(
        self, req_ids: list[str], rows: np.ndarray, step: Any = None
    ) -> dict[str, list[int]]:
        """Drafts for the requests that just sampled (`rows`: their input-batch rows, whose
        tokens are current), by request; those that cannot draft get none. (`step`: the step's
        `StepInputs`, which an EAGLE head reads.)"""
        plan = self._plan(req_ids, rows)
        if plan is None:
            return {}
        ids, rows, n, num = plan
        starts = np.fromiter((self._computed.get(r, 0) for r in ids), np.int64, len(ids))
        for r, count in zip(ids, n.tolist()):
            self._computed[r] = count
        starts = self._catch_up(rows, starts, n)

        def forward(j: int, active: np.ndarray) -> torch.Tensor:
            if j == 0:
                logits = self._run(rows, starts, n - starts, logits=True)
            else:  # d_j at position n + j - 1
                ones = np.ones(len(active), np.int64)
                logits = self._run(rows[active], n[active] + j - 1, ones, logits=True)
            assert logits is not None
            return logits

        return self._draft(ids, rows, n, num, forward)

    def _plan(
        self, req_ids: list[str], rows: np.ndarray
    ) -> tuple[list[str], np.ndarray, np.ndarray, np.ndarray] | None:
        """The requests that draft, their rows, known tokens n and draft counts (None: none):
        at most k, and no K/V past the slots their blocks hold (a draft forward writes
        positions up to n + num - 2)."""
        batch = self.batch
        assert batch is not None
        n = batch.num_tokens[rows]
        limit = np.minimum(batch.num_blocks[rows] * self.block_size, self.max_model_len)
        num = np.minimum(self.k, limit - n + 1)  # d_j's K/V goes to position n + j - 1
        # NOTE: the scheduler gives no drafts to requests whose sampling reads their history.
        num[batch.presence_penalty[rows] != 0] = 0
        num[batch.frequency_penalty[rows] != 0] = 0
        num[batch.repetition_penalty[rows] != 1] = 0
        num[batch.min_tokens[rows] > 0] = 0
        keep = np.flatnonzero(num > 0)
        if not keep.size:
            return None
        ids = [req_ids[i] for i in keep.tolist()]
        for r in ids:
            self._probs.pop(r, None)
        return ids, rows[keep], n[keep], num[keep]

    def _draft(
        self,
        ids: list[str],
        rows: np.ndarray,
        n: np.ndarray,
        num: np.ndarray,
        forward: Callable[[int, np.ndarray], torch.Tensor],
    ) -> dict[str, list[int]]:
        """The k-step loop: `forward(j, active)` gives the logits of draft j + 1 of the
        requests `active` (indices into `ids`; all of them for j = 0), d_j being written
        after their known tokens first. Sampled requests keep their q (`_probs`)."""
        batch = self.batch
        assert batch is not None
        random = batch.temperature[rows] > 0
        drafts = np.zeros((len(ids), self.k), np.int64)
        probs: list[list[torch.Tensor]] = [[] for _ in ids]
        active = np.arange(len(ids))
        for j in range(int(num.max())):
            if j > 0:
                active = active[num[active] > j]
                batch.token_ids[rows[active], n[active] + j - 1] = drafts[active, j - 1]
            tokens, q = self._draw(forward(j, active), rows[active], n[active], j)
            drafts[active, j] = tokens
            if q is not None:
                for a, i in enumerate(active.tolist()):
                    if random[i]:
                        probs[i].append(q[a])
        out: dict[str, list[int]] = {}
        for i, r in enumerate(ids):
            out[r] = drafts[i, : num[i]].tolist()
            if random[i]:
                self._probs[r] = (int(n[i]), out[r], torch.stack(probs[i]))
        return out

    def _catch_up(self, rows: np.ndarray, starts: np.ndarray, n: np.ndarray) -> np.ndarray:
        """Forwards without logits over the leading tokens the draft's cache lacks, while they
        are more than a target step's token budget (a long prompt new to the draft), so that
        no draft forward is larger than a step the memory profile saw. Returns the new starts
        (each request keeps at least its last token for the forward that drafts)."""
        starts = starts.copy()
        while int((n - starts).sum()) > self.max_forward_tokens:
            take = np.minimum(n - starts - 1, self.max_forward_tokens)
            take = np.minimum(
                take, np.maximum(self.max_forward_tokens - (np.cumsum(take) - take), 0)
            )
            sel = np.flatnonzero(take > 0)
            if not sel.size:
                break
            self._run(rows[sel], starts[sel], take[sel], logits=False)
            starts[sel] += take[sel]
        return starts

    def _draw(
        self, logits: torch.Tensor, rows: np.ndarray, num_known: np.ndarray, j: int
    ) -> tuple[np.ndarray, torch.Tensor | None]:
        """Draft j + 1 of the rows from their logits: the drafted ids (host) and the
        distributions they were drawn from (None: every row greedy)."""
        batch = self.batch
        assert batch is not None and self.stager is not None and self.sampler is not None
        if not (batch.temperature[rows] > 0).any():
            return argmax_rows(logits).cpu().numpy(), None
        md = batch.make_sampling_metadata(rows, self.stager, self.sampler.rng)
        q = target_probs(logits, md)
        noise = self._noise(q.shape, rows, num_known - batch.num_prompt_tokens[rows], j)
        return argmax_rows(q / noise).cpu().numpy(), q

    def _attn_inputs(
        self, rows: np.ndarray, starts: np.ndarray, query_lens: np.ndarray
    ) -> tuple[AttentionMetadata, np.ndarray, np.ndarray, np.ndarray]:
        """The attention metadata of a draft forward of the rows' positions [starts,
        starts + query_lens) (their K/V into the draft's cache), and per token its row and
        position, and the query ends (cumsum of query_lens)."""
        batch, st, bs = self.batch, self.stager, self.block_size
        assert batch is not None and st is not None
        cu = np.cumsum(query_lens)
        total = int(cu[-1])
        token_rows = np.repeat(rows, query_lens)
        positions = np.repeat(starts, query_lens) + (
            np.arange(total) - np.repeat(cu - query_lens, query_lens)
        )
        seq_lens = starts + query_lens
        blocks = batch.block_table[token_rows, positions // bs].astype(np.int64)
        query_start_loc = np.zeros(len(rows) + 1, dtype=np.int32)
        query_start_loc[1:] = cu
        attn_inputs = StepAttentionInputs(
            query_start_loc=query_start_loc,
            seq_lens=seq_lens.astype(np.int32),
            block_table=batch.block_table[rows, : cdiv(int(seq_lens.max()), bs)],
            slot_mapping=blocks * bs + positions % bs,
            max_query_len=int(query_lens.max()),
        )
        return self.attn_builder.build(attn_inputs, st.to_device), token_rows, positions, cu

    def _run(
        self, rows: np.ndarray, starts: np.ndarray, query_lens: np.ndarray, logits: bool
    ) -> torch.Tensor | None:
        """A draft forward of the rows' tokens [starts, starts + query_lens) (their K/V into
        the draft's cache); the logits of each row's last token if `logits`."""
        batch, st = self.batch, self.stager
        assert batch is not None and st is not None
        metadata, token_rows, positions, cu = self._attn_inputs(rows, starts, query_lens)
        ids = st.to_device(batch.token_ids[token_rows, positions].astype(np.int64))
        with set_forward_context(metadata):
            hidden = self.model(ids, st.to_device(positions))
        return self.model.compute_logits(hidden[st.to_device(cu - 1)]) if logits else None

    def _noise(
        self, shape: torch.Size, rows: np.ndarray, positions: np.ndarray, j: int
    ) -> torch.Tensor:
        """Exp(1) noise for the draws of draft j + 1 (1 for greedy rows): a seeded request's
        from a generator keyed by its seed and output position, the others' from the RNG's."""
        batch, sampler = self.batch, self.sampler
        assert batch is not None and sampler is not None
        noise = torch.empty(shape, device=self.device)
        seeded = batch.seeded[rows]
        if not seeded.all():
            noise.exponential_(generator=sampler.rng.generator)
        if seeded.any():
            keys = SamplingRNG.sample_keys(
                np.ones(int(seeded.sum()), bool),
                batch.seed_keys[rows[seeded]],
                positions[seeded] + (j + 1) * _DRAFT_KEY_STRIDE,
                0,
            )
            for key, i in zip(keys.tolist(), np.flatnonzero(seeded).tolist()):
                gen = torch.Generator(device=self.device)
                gen.manual_seed(int(key) & MASK63)
                noise[i].exponential_(generator=gen)
        greedy = torch.from_numpy(batch.temperature[rows] == 0).to(self.device)
        return noise.masked_fill_(greedy.unsqueeze(1), 1.0)

    # ----- verification -----

    def draft_probs(self, req_ids: list[str], layout: DraftLayout) -> torch.Tensor | None:
        """fp32 [sum k, V]: the distribution each draft of `layout` was drawn from, q for a
        sampled request's, one-hot for a greedy one's (`spec_decode.DraftProbs`); None when
        every draft is deterministic."""
        batch = self.batch
        assert batch is not None
        stored = [self._probs.pop(r, None) for r in req_ids]
        if all(s is None for s in stored):
            return None
        vocab = next(s[2].shape[1] for s in stored if s is not None)
        q = torch.zeros(len(layout.draft_ids), vocab, device=self.device)
        d = 0
        for req_id, s, m in zip(req_ids, stored, layout.num_drafts.tolist()):
            ids = layout.draft_ids[d : d + m]
            if s is None:
                rows = torch.arange(d, d + m, device=self.device)
                q[rows, torch.from_numpy(ids).to(self.device)] = 1.0
            else:
                num_tokens, drafts, probs = s
                # NOTE: the scheduler sends a prefix of the drafts, after the same tokens.
                assert num_tokens == batch.num_tokens[batch.req_to_row[req_id]]
                assert drafts[:m] == ids.tolist(), "drafts verified are the ones proposed"
                q[d : d + m] = probs[:m]
            d += m
        return q
