"""EAGLE and EAGLE-3 speculative decoding (methods "eagle", "eagle3"): a head that reads the
target's hidden states proposes each step's drafts (`models/llama_eagle.py`,
`models/llama_eagle3.py`).

The head is loaded as the draft model is (`DraftModel`: its attention layers get their own
cache tensors under the target's block table, the same sampling of drafts and the same k-step
loop), with the target's token embedding (and, for EAGLE, LM head) shared. The target exposes
its hidden states through `LlamaModel.aux_hidden_state_layers` and a static buffer of this
proposer's (`hidden_state_buffer`, which CUDA graph replays fill too): EAGLE reads the final
normed output, EAGLE-3 the inputs of three layers. Only the Llama family (`LlamaModel`) has
them; another target is refused at start-up.

Inputs: the head's row at position p reads token p + 1 and the target's hidden state at p, and
predicts token p + 2. After each step (the engine steps synchronously with speculation, so the
buffer still holds that step's target forward), one head forward covers every scheduled
request's rows of the step (its K/V for the positions the target computed):
- a request that sampled, now with n known tokens: positions [start, n - 1) (the verified
  ones; the rejected drafts' hidden states are dropped); its last row gives d_1;
- a prompt chunk that did not sample: all its positions (the token after the chunk is known).
Then k - 1 one-token forwards: d_j at position n + j - 2 with the head's own last hidden state
(EAGLE: its residual stream; EAGLE-3: its pre-norm output), giving d_{j+1}. A position's K/V is
rewritten with verified inputs by the next step, so nothing is tracked per request; positions
the target did not compute (a prefix-cache hit) keep what the request that computed them left
(the same tokens) or zeros: only the drafts' quality depends on them, never the output.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pagedllm.attention.backend import AttentionBackend
from pagedllm.config import EngineConfig
from pagedllm.forward_context import set_forward_context
from pagedllm.models.eagle_utils import target_hidden_layers
from pagedllm.models.llama import LlamaModel
from pagedllm.worker.draft_model import DraftModel


class EagleProposer(DraftModel):
    def __init__(
        self,
        config: EngineConfig,
        device: torch.device,
        attn_backend: type[AttentionBackend],
        target: Any,
    ) -> None:
        spec = config.speculative_config
        assert spec is not None and spec.draft_model_config is not None
        inner = getattr(target, "model", None)
        if not isinstance(inner, LlamaModel) or config.parallel_config.pipeline_parallel_size > 1:
            raise ValueError(
                f"speculative_config.model={spec.model!r}: method {spec.method!r} reads the "
                f"target's hidden states, which only the Llama family exposes (without pipeline "
                f"parallelism); the target is {type(target).__name__}"
            )
        super().__init__(config, device, attn_backend)
        head: Any = self.model
        head.share_target(target)
        layers = target_hidden_layers(
            spec.method, spec.draft_model_config.hf_config, len(inner.layers)
        )
        sc = config.scheduler_config
        rows = max(sc.max_num_batched_tokens, sc.max_num_seqs)
        dtype = getattr(torch, config.model_config.dtype)
        hidden = config.model_config.hidden_size
        inner.aux_hidden_state_layers = layers
        inner.hidden_state_buffer = torch.zeros(
            rows, len(layers) * hidden, dtype=dtype, device=device
        )
        self.target_hidden = inner.hidden_state_buffer

    @torch.inference_mode()
    def propose(
        self, req_ids: list[str], rows: np.ndarray, step: Any = None
    ) -> dict[str, list[int]]:
        """Drafts for the requests that sampled (see the module's docstring); `step`: the
        step's `StepInputs` (every scheduled request's rows, starts and query lengths)."""
        assert step is not None and self.batch is not None
        batch = self.batch
        all_rows, starts, query_lens = step.rows, step.starts, step.query_lens
        counts = np.where(step.sample_mask, batch.num_tokens[all_rows] - 1 - starts, query_lens)
        counts = np.clip(counts, 0, query_lens)
        sampled_ok = counts[step.sample_mask] > 0  # NOTE: always, for a request that sampled
        plan = self._plan(req_ids, rows) if sampled_ok.all() else None
        caught = np.flatnonzero(counts > 0)
        if not caught.size:
            return {}
        # the target's hidden rows of the caught-up positions (request i's from its offset)
        offsets = np.cumsum(query_lens) - query_lens
        c = counts[caught]
        flat = np.repeat(offsets[caught], c) + (
            np.arange(int(c.sum())) - np.repeat(np.cumsum(c) - c, c)
        )
        st = self.stager
        assert st is not None
        head: Any = self.model  # an EAGLE head (`models/llama_eagle.py`'s interface)
        hidden_in = head.combine_hidden_states(self.target_hidden[st.to_device(flat)])
        out_hidden, next_hidden = self._run_head(all_rows[caught], starts[caught], c, hidden_in)
        if plan is None:
            return {}
        ids, d_rows, n, num = plan
        # each drafting request's last caught-up row
        where = {int(r): k for k, r in enumerate(all_rows[caught].tolist())}
        last = (np.cumsum(c) - 1)[[where[int(r)] for r in d_rows.tolist()]]
        last_t = st.to_device(last)
        state = {"hidden": next_hidden[last_t].clone()}
        first_logits = head.compute_logits(out_hidden[last_t])

        def forward(j: int, active: np.ndarray) -> torch.Tensor:
            if j == 0:
                return first_logits
            act = st.to_device(active)
            ones = np.ones(len(active), np.int64)
            o, nxt = self._run_head(d_rows[active], n[active] + j - 2, ones, state["hidden"][act])
            state["hidden"][act] = nxt
            return head.compute_logits(o)

        return self._draft(ids, d_rows, n, num, forward)

    def _run_head(
        self, rows: np.ndarray, starts: np.ndarray, query_lens: np.ndarray, hidden: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A head forward of the rows' positions [starts, starts + query_lens), each reading
        the token after it and its row of `hidden`; (the rows' outputs for the logits, their
        hidden states for the next step)."""
        batch, st = self.batch, self.stager
        assert batch is not None and st is not None
        metadata, token_rows, positions, _ = self._attn_inputs(rows, starts, query_lens)
        ids = st.to_device(batch.token_ids[token_rows, positions + 1].astype(np.int64))
        with set_forward_context(metadata):
            head: Any = self.model
            return head(ids, st.to_device(positions), hidden)
