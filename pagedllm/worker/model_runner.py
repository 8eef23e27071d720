"""ModelRunner: SchedulerOutput → flat inputs → model → sampler → ModelRunnerOutput.

All scheduled tokens of all requests run as one flat batch (no padding, no batch dimension);
logits are computed only for the last row of each request that reaches the end of its known
tokens (a prompt chunk that stops short samples nothing), and for the prompt rows of the requests
that asked for prompt logprobs. The step's results come back to the host in one sync.

A step is `launch`ed (inputs prepared, kernels queued, result copies started) and later
`collect`ed (one wait, the output built). Between the two the next step may be launched (async
scheduling): its rows whose last token the previous step is still sampling take that id from
the previous step's device tensor, so no step waits for the host to see the ids.

Speculative decoding (`spec_decode.py`): a request with drafts runs its last token then its
drafts, and its last 1 + k rows give logits; such a step is sampled and brought to the host at
once (`_sample_spec`), as the engine core steps synchronously with speculation on. With a draft
model (`draft_model.py`) the draft proposes once a step is collected, and the output carries
the proposals back to the scheduler (`ModelRunnerOutput.draft_token_ids`).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import numpy as np
import torch
from torch.nn import functional as F

from pagedllm.attention.backend import (
    AttentionBackend,
    AttentionMetadata,
    StepAttentionInputs,
    pad_1d,
)
from pagedllm.attention.layer import Attention
from pagedllm.attention.utils import build_step_inputs
from pagedllm.config import EngineConfig
from pagedllm.engine.exceptions import RequestPreparationError
from pagedllm.engine.outputs import GrammarOutput, Logprobs, ModelRunnerOutput, SchedulerOutput
from pagedllm.forward_context import set_forward_context
from pagedllm.layers.linear import LinearBase
from pagedllm.models.interface import CausalLM
from pagedllm.utils import cdiv
from pagedllm.worker.buckets import padded_rows, row_buckets
from pagedllm.worker.cuda_graph import CudaGraphRunner, capture_sizes
from pagedllm.worker.draft_model import DraftModel
from pagedllm.worker.input_batch import InputBatch
from pagedllm.worker.pipeline import PipelineStage
from pagedllm.worker.sample import (
    HostLogprobs,
    Sampler,
    SamplerOutput,
    SamplingMetadata,
    compute_prompt_logprobs,
)
from pagedllm.worker.sample.rejection import DraftLayout
from pagedllm.worker.spec_decode import SpecDecodeSampler, draft_layout, write_drafts
from pagedllm.worker.staging import HostStager, PendingHost

logger = logging.getLogger(__name__)


@dataclass
class PromptLogprobsPlan:
    """Which hidden rows give prompt logprobs this step: `indices[j]` predicts `targets[j]`;
    request `req_ids[i]` owns `counts[i]` consecutive rows, starting at prompt token `starts[i]`."""

    req_ids: list[str]
    batch_rows: list[int]
    starts: list[int]
    counts: list[int]
    indices: np.ndarray
    targets: np.ndarray


@dataclass
class StepInputs:
    """One step's flat model inputs, on the device."""

    req_ids: list[str]
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor | None  # rows of the hidden states that sample (None: all)
    sample_rows: np.ndarray  # input-batch rows of the requests that sample, in logits order
    sample_mask: np.ndarray  # bool [num_reqs]: which scheduled requests sample
    prompt_logprobs: PromptLogprobsPlan | None
    graph_size: int | None = None  # a decode step replayed from the CUDA graph of this size
    # Speculative decoding: the drafts of the requests that sample (in logits order: request
    # i's 1 + num_drafts[i] rows), None when no request drafts this step.
    drafts: DraftLayout | None = None
    # Every scheduled request's input-batch row, computed tokens before the step and query
    # length (an EAGLE head reads them: `worker/eagle.py`).
    rows: np.ndarray | None = None
    starts: np.ndarray | None = None
    query_lens: np.ndarray | None = None

    @property
    def num_logits_rows(self) -> int:
        """The logits rows that sample (one per sampling request, plus their drafts)."""
        return len(self.sample_rows) if self.drafts is None else self.drafts.num_rows


@dataclass
class InFlightStep:
    """A launched step: what `collect` needs to finish it. Until it is sampled (`results` is
    None: a step waiting for its grammar bitmask) it holds its `logits`."""

    step_id: int
    inputs: StepInputs
    logits: torch.Tensor | None  # the rows that sample, then the prompt-logprob rows
    results: PendingHost | None = None  # sampled ids, then the sampled and prompt logprobs
    has_sampled_lp: bool = False
    has_prompt_lp: bool = False
    positions: np.ndarray | None = None  # where each sampled id goes in its row
    generations: np.ndarray | None = None  # the sampled rows' generations at launch
    output: ModelRunnerOutput | None = None  # a speculative step's, known once sampled


class ModelRunner:
    def __init__(
        self,
        config: EngineConfig,
        model: CausalLM,
        device: torch.device,
        attn_backend: type[AttentionBackend],
        drafter: DraftModel | None = None,
    ) -> None:
        """`drafter`: the draft model of speculative decoding, which proposes after each step
        (None: drafts come from the engine core, or no speculation)."""
        self.config = config
        self.model = model
        self.device = device
        self.block_size = config.cache_config.block_size
        max_model_len = config.model_config.max_model_len
        # NOTE: the backend's builder owns the metadata layout and the CUDA graphs' buffers.
        self.attn_builder = attn_backend.get_builder_cls()(device, max_model_len)
        self.input_batch = InputBatch(
            max_num_reqs=config.scheduler_config.max_num_seqs,
            max_model_len=max_model_len,
            max_blocks_per_req=cdiv(max_model_len, self.block_size),
            eos_token_ids=config.model_config.eos_token_ids,
        )
        # NOTE: the sampler's `rng` is the one owner of sampling's randomness (the engine seed,
        # the kernel path's step keys, the seeded requests' generators, which outlive their
        # preemptions) and chooses the path once: the kernel on CUDA, the torch ops elsewhere.
        self.sampler = Sampler(seed=config.model_config.seed, device=device)
        self.attention_layers = [m for m in model.modules() if isinstance(m, Attention)]
        self.stager = HostStager(device)
        dtype = getattr(torch, config.model_config.dtype)
        self.pipeline = PipelineStage(config.model_config.hidden_size, dtype, device)
        self.spec_sampler = SpecDecodeSampler(self.input_batch, self.stager, self.sampler)
        self.drafter = drafter
        if drafter is not None:
            drafter.bind(self.input_batch, self.stager, self.sampler)
        self.cuda_graphs: CudaGraphRunner | None = None
        self._step_id = 0
        # The last launched step's id and its sampled ids on the device.
        self._last_sampled: tuple[int, torch.Tensor] | None = None
        # Host buffers the grammar bitmask is filled into, one per step parity (pinned on
        # CUDA: copied to the device as they are, while the other may still be in flight).
        self._bitmask_host: list[torch.Tensor | None] = [None, None]

    @torch.inference_mode()
    def warm_up(self) -> None:
        """Compiles the attention kernels' variants before the first request, so that no
        request waits for Triton's JIT: a prompt chunk beside a decode token, then a lone
        decode over a long context (the split-KV path); then the sampler's kernel; then every
        GEMM shape an eager step or the LM head can run (`_warm_up_gemms`).

        NOTE: every position maps to block 0, which gets finite garbage; harmless, as a block's
        slots are always written before they are read once a request owns it."""
        if self.device.type != "cuda" or self.pipeline.enabled:
            return  # NOTE: pipeline stages start cold (their first steps compile)
        max_len = self.config.model_config.max_model_len
        chunk = min(256, max_len)
        for query_lens, seq_lens in (([chunk, 1], [chunk, 2]), ([1], [max_len])):
            tables = [[0] * cdiv(n, self.block_size) for n in seq_lens]
            inputs = build_step_inputs(query_lens, seq_lens, tables, self.block_size)
            md = self.attn_builder.build(inputs, self.stager.to_device)
            n = md.num_actual_tokens
            ids = torch.zeros(n, dtype=torch.int64, device=self.device)
            with set_forward_context(md):
                hidden = self.model(ids, torch.zeros_like(ids))
            logits = self.model.compute_logits(hidden[-1:])
        from pagedllm.worker.sample import kernels as sample_kernels

        sample_kernels.warm_up(logits)
        self._warm_up_gemms(hidden)
        torch.cuda.synchronize(self.device)

    def _warm_up_gemms(self, hidden: torch.Tensor) -> None:
        """Every linear layer at every row count an eager step pads to, and the LM head at every
        count of sampled rows (see `row_bucket`: the first launch of a cuBLAS kernel blocks the
        host until the GPU is idle). Decode steps' layers are warmed by the graph capture."""
        sc = self.config.scheduler_config
        layers: dict[tuple[object, ...], LinearBase] = {}
        for m in self.model.modules():
            if isinstance(m, LinearBase):
                # NOTE: by the layer's sizes, not its weight's: a quantized weight's shape and
                # dtype are its method's business.
                key = (type(m), m.input_size_per_partition, m.output_size_per_partition)
                layers.setdefault((*key, m.params_dtype, m.bias is None, type(m.quant_method)), m)
        max_rows = sc.max_num_batched_tokens
        inputs: dict[int, torch.Tensor] = {}
        for layer in layers.values():
            in_features = layer.input_size_per_partition
            if in_features not in inputs:
                inputs[in_features] = hidden.new_zeros(max_rows, in_features)
            for rows in row_buckets(max_rows):
                layer(inputs[in_features][:rows])
        del inputs
        sampled = hidden.new_zeros(sc.max_num_seqs, hidden.shape[-1])
        for rows in row_buckets(sc.max_num_seqs):
            self.model.compute_logits(sampled[:rows])

    def _padded_rows(self, rows: int, cap: int) -> int:
        """The rows an eager GEMM runs at: on the GPU, a count `warm_up` ran (`row_bucket`)."""
        return padded_rows(rows, cap) if self.device.type == "cuda" else rows

    def capture_cuda_graphs(self) -> None:
        """Captures the decode graphs (after the KV cache is bound), unless the config says
        eager or the attention backend cannot be captured."""
        if self.device.type != "cuda" or self.config.enforce_eager or self.pipeline.enabled:
            return  # NOTE: pipeline stages run eagerly (their graphs would hold the sends)
        impls = [layer.impl for layer in self.attention_layers]
        if impls and not all(impl.cuda_graph_safe for impl in impls):
            logger.info(
                "attention backend %s cannot be captured: decode runs eagerly",
                type(impls[0]).__name__,
            )
            return
        sc = self.config.scheduler_config
        self.cuda_graphs = CudaGraphRunner(
            self.model,
            capture_sizes(sc.max_num_seqs),
            self.attn_builder,
            self.input_batch.block_table.shape[1],
            self.device,
        )
        self.cuda_graphs.capture()

    # ----- state updates -----

    def _update_states(self, out: SchedulerOutput) -> None:
        batch, rng = self.input_batch, self.sampler.rng
        for req_id in out.finished_req_ids:
            batch.remove_request(req_id)
            rng.finish_request(req_id)
        for req_id in out.preempted_req_ids:
            batch.remove_request(req_id)  # NOTE: its RNG state stays, for when it resumes
        if self.drafter is not None:
            for req_id in out.finished_req_ids | out.preempted_req_ids:
                self.drafter.remove_request(req_id)
        for new in out.scheduled_new_reqs:
            try:
                rng.add_request(new.req_id, new.sampling_params.seed)
                batch.add_request(
                    new.req_id,
                    new.prompt_token_ids,
                    new.output_token_ids,
                    new.block_ids,
                    new.sampling_params,
                )
            except Exception as e:
                # NOTE: its row is undone; the engine fails this request alone.
                batch.remove_request(new.req_id)
                rng.finish_request(new.req_id)
                raise RequestPreparationError(new.req_id, e) from e
        for cached in out.scheduled_cached_reqs:
            batch.append_block_ids(batch.req_to_row[cached.req_id], cached.new_block_ids)

    # ----- inputs -----

    def _prepare_inputs(self, out: SchedulerOutput) -> StepInputs:
        batch = self.input_batch
        req_ids = list(out.num_scheduled_tokens)
        num_reqs = len(req_ids)
        rows = np.fromiter((batch.req_to_row[r] for r in req_ids), np.int64, num_reqs)
        query_lens = np.fromiter(out.num_scheduled_tokens.values(), np.int64, num_reqs)
        starts = self._num_computed(out, req_ids)
        seq_lens = starts + query_lens
        spec = out.scheduled_spec_decode_tokens
        num_drafts = write_drafts(batch, spec, req_ids, rows)
        cu = np.cumsum(query_lens)
        num_tokens = int(cu[-1])

        token_rows = np.repeat(rows, query_lens)
        offsets = np.arange(num_tokens) - np.repeat(cu - query_lens, query_lens)
        positions = np.repeat(starts, query_lens) + offsets
        input_ids = batch.token_ids[token_rows, positions].astype(np.int64)
        block_ids = batch.block_table[token_rows, positions // self.block_size]
        slot_mapping = block_ids.astype(np.int64) * self.block_size + positions % self.block_size
        max_blocks = cdiv(int(seq_lens.max()), self.block_size)
        block_table = batch.block_table[rows, :max_blocks]
        query_start_loc = np.zeros(num_reqs + 1, dtype=np.int32)
        query_start_loc[1:] = cu
        attn_inputs = StepAttentionInputs(
            query_start_loc=query_start_loc,
            seq_lens=seq_lens.astype(np.int32),
            block_table=block_table,
            slot_mapping=slot_mapping,
            max_query_len=int(query_lens.max()),
        )

        sample_mask = seq_lens == batch.num_tokens[rows] + num_drafts
        logits_indices = (cu - 1)[sample_mask]
        drafts, logits_indices = draft_layout(
            spec, req_ids, sample_mask, num_drafts, logits_indices
        )
        pending = self._pending_inputs(rows, sample_mask, cu)
        st = self.stager
        graph_size = None
        if self.cuda_graphs is not None and num_tokens == num_reqs:
            graph_size = self.cuda_graphs.padded_size(num_reqs)
        if graph_size is None:
            metadata = self.attn_builder.build(attn_inputs, st.to_device)
            # NOTE: padding rows (token 0 at position 0) are neither cached nor attended (past
            # num_actual_tokens) nor sampled.
            sc = self.config.scheduler_config
            padded = self._padded_rows(num_tokens, sc.max_num_batched_tokens)
            if padded > num_tokens:
                input_ids, positions = pad_1d(input_ids, padded, 0), pad_1d(positions, padded, 0)
            ids_t, positions_t = st.to_device(input_ids), st.to_device(positions)
        else:
            # A decode step replayed from a graph: inputs go to its static buffers, padded.
            g, size = self.cuda_graphs, graph_size
            assert g is not None
            st.copy_into(pad_1d(input_ids, size, 0), g.input_ids[:size])
            st.copy_into(pad_1d(positions, size, 0), g.positions[:size])
            metadata = self.attn_builder.fill_graph(attn_inputs, size, st.copy_into, st.to_device)
            ids_t, positions_t = g.input_ids[:size], g.positions[:size]
        if pending is not None:
            flat, src, sampled = pending
            n = len(flat)
            if flat[0] + n - 1 == flat[-1] and (src == np.arange(n)).all():
                # NOTE: the usual decode step: the same requests in the same order, one copy.
                ids_t[flat[0] : flat[0] + n].copy_(sampled[:n])
            else:
                ids_t[st.to_device(flat)] = sampled[st.to_device(src)]
        every_row_samples = logits_indices.size == num_tokens
        return StepInputs(
            req_ids=req_ids,
            input_ids=ids_t,
            positions=positions_t,
            attn_metadata=metadata,
            logits_indices=None if every_row_samples else st.to_device(logits_indices),
            sample_rows=rows[sample_mask],
            sample_mask=sample_mask,
            prompt_logprobs=self._plan_prompt_logprobs(req_ids, rows, starts, seq_lens, cu),
            graph_size=graph_size,
            drafts=drafts,
            rows=rows,
            starts=starts,
            query_lens=query_lens,
        )

    def _pending_inputs(
        self, rows: np.ndarray, sample_mask: np.ndarray, cu: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, torch.Tensor] | None:
        """The input rows whose token the last launched step is still sampling: (flat input
        indices, indices into that step's sampled ids, those ids on the device).

        Such a token is always its request's last, so only a request whose query reaches its
        end (one that samples) can hold one, as its last query row."""
        if self._last_sampled is None:
            return None
        step_id, sampled = self._last_sampled
        which = sample_mask & (self.input_batch.pending_step[rows] == step_id)
        if not which.any():
            return None
        src = self.input_batch.pending_index[rows[which]]
        return (cu - 1)[which], src, sampled

    def _plan_prompt_logprobs(
        self,
        req_ids: list[str],
        rows: np.ndarray,
        starts: np.ndarray,
        seq_lens: np.ndarray,
        cu: np.ndarray,
    ) -> PromptLogprobsPlan | None:
        """The rows at positions p < num_prompt - 1 of the requests that want prompt logprobs:
        position p's logits give prompt token p + 1's logprob."""
        batch = self.input_batch
        asking = np.flatnonzero(batch.num_prompt_logprobs[rows] >= 0)
        if not asking.size:
            return None
        plan = PromptLogprobsPlan([], [], [], [], np.zeros(0, np.int64), np.zeros(0, np.int64))
        indices, targets = [], []
        for i in asking:  # NOTE: only the (rare) requests that asked.
            row, start = int(rows[i]), int(starts[i])
            end = min(int(seq_lens[i]), int(batch.num_prompt_tokens[row]) - 1)
            if end <= start:
                continue
            first_index = int(cu[i]) - int(seq_lens[i] - starts[i])
            indices.append(np.arange(first_index, first_index + end - start))
            targets.append(batch.token_ids[row, start + 1 : end + 1].astype(np.int64))
            plan.req_ids.append(req_ids[i])
            plan.batch_rows.append(row)
            plan.starts.append(start + 1)
            plan.counts.append(end - start)
        if not plan.req_ids:
            return None
        plan.indices, plan.targets = np.concatenate(indices), np.concatenate(targets)
        return plan

    @staticmethod
    def _num_computed(out: SchedulerOutput, req_ids: list[str]) -> np.ndarray:
        computed = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        computed.update((r.req_id, r.num_computed_tokens) for r in out.scheduled_cached_reqs)
        return np.fromiter((computed[r] for r in req_ids), np.int64, len(req_ids))

    # ----- the step -----

    def abandon_steps(self) -> None:
        """Forgets the launched steps without collecting them (one raised). Their requests are
        all dropped from the batch by the next step (ended, or sent back to be recomputed)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)  # NOTE: their copies to the host are done
        self._last_sampled = None

    @torch.inference_mode()
    def launch(self, out: SchedulerOutput) -> InFlightStep | None:
        """Queues the step's work on the device; returns None when nothing runs. A step with
        constrained rows queues its forward only: `sample_tokens` brings their bitmask."""
        self._update_states(out)
        if out.is_empty:
            return None
        self.stager.next_step()  # NOTE: safe: the step before the last one was collected
        self._step_id += 1
        inputs = self._prepare_inputs(out)
        if inputs.graph_size is not None:
            assert self.cuda_graphs is not None
            hidden = self.cuda_graphs.replay(inputs.graph_size)
        else:
            with set_forward_context(inputs.attn_metadata):
                hidden = self.pipeline.forward(self.model, inputs.input_ids, inputs.positions)
        if hidden is None:  # a pipeline stage before the last: its ids come from the last
            step = InFlightStep(step_id=self._step_id, inputs=inputs, logits=None)
            if not out.structured_output_request_ids:
                self._sample(step, None)
            return step
        plan = inputs.prompt_logprobs
        num_sampled = inputs.num_logits_rows
        indices = inputs.logits_indices
        if indices is None:  # every row samples: no gather
            indices = None if plan is None else torch.arange(num_sampled, device=hidden.device)
        if plan is not None:
            assert indices is not None
            indices = torch.cat([indices, self.stager.to_device(plan.indices)])
        num_rows = num_sampled if indices is None else indices.shape[0]
        padded = self._padded_rows(num_rows, self.config.scheduler_config.max_num_seqs)
        if indices is None and hidden.shape[0] >= padded:
            sampling_hidden = hidden[:padded]
        else:
            if indices is None:
                indices = torch.arange(num_rows, device=hidden.device)
            if padded > num_rows:  # padding rows repeat row 0; their logits are dropped
                indices = F.pad(indices, (0, padded - num_rows))
            sampling_hidden = hidden[indices]
        logits = self.model.compute_logits(sampling_hidden)[:num_rows]
        step = InFlightStep(step_id=self._step_id, inputs=inputs, logits=logits)
        if not out.structured_output_request_ids:
            self._sample(step, None)
        return step

    @torch.inference_mode()
    def sample_tokens(self, step: InFlightStep | None, grammar: GrammarOutput) -> None:
        """Queues the sampling of a launched step with its constrained rows' bitmask."""
        if step is not None:
            self._sample(step, grammar)

    def bitmask_buffer(self, rows: int, words: int) -> np.ndarray:
        """The host array the last launched step's grammar bitmask is filled into."""
        slot = self._step_id % 2
        host = self._bitmask_host[slot]
        if host is None or host.shape[0] < rows or host.shape[1] != words:
            pinned = self.device.type == "cuda"
            host = torch.empty((max(rows, 64), words), dtype=torch.int32, pin_memory=pinned)
            self._bitmask_host[slot] = host
        return host[:rows].numpy()

    def _bitmask_to_device(self, bitmask: np.ndarray) -> torch.Tensor:
        """`bitmask` on the device: a buffer of `bitmask_buffer` is copied without staging."""
        address = bitmask.__array_interface__["data"][0]
        for host in self._bitmask_host:
            if host is not None and host.data_ptr() == address and bitmask.flags.c_contiguous:
                return host[: bitmask.shape[0]].to(self.device, non_blocking=True)
        return self.stager.to_device(bitmask)

    def _grammar_rows(
        self, sampled: list[str], grammar: GrammarOutput
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """The grammar's bitmask rows of the requests `sampled` (the sampled rows' requests, in
        order), and where they go among the sampled rows (None: row for row)."""
        if grammar.req_ids == sampled:
            return grammar.bitmask, None
        where = {req_id: k for k, req_id in enumerate(sampled)}
        keep = [i for i, r in enumerate(grammar.req_ids) if r in where]
        rows = np.fromiter((where[grammar.req_ids[i]] for i in keep), np.int64, len(keep))
        return grammar.bitmask[keep], rows

    def _sample(self, step: InFlightStep, grammar: GrammarOutput | None) -> None:
        """Samples the step's rows (their logits are queued), queues the prompt logprobs and
        the results' copies to the host, and puts placeholders for the ids in the batch."""
        if step.inputs.drafts is not None:
            self._sample_spec(step, grammar)
            return
        inputs, logits = step.inputs, step.logits
        assert step.results is None, "a step is sampled once"
        step.logits = None
        plan = inputs.prompt_logprobs
        num_sampled = len(inputs.sample_rows)
        md = self.input_batch.make_sampling_metadata(
            inputs.sample_rows, self.stager, self.sampler.rng
        )
        if logits is None:  # a pipeline stage before the last
            sampled = SamplerOutput(self.pipeline.share_sampled(None, num_sampled), None)
        else:
            sampled_req_ids = [
                inputs.req_ids[i] for i in np.flatnonzero(inputs.sample_mask).tolist()
            ]
            self._add_bitmask(md, sampled_req_ids, grammar)
            sampled = self.sampler.sample(logits[:num_sampled], md)
            self.pipeline.share_sampled(sampled.token_ids, num_sampled)
        prompt_lp = None
        if plan is not None and logits is not None:
            targets = self.stager.to_device(plan.targets)
            n = int(self.input_batch.num_prompt_logprobs[plan.batch_rows].max())
            prompt_lp = compute_prompt_logprobs(logits[num_sampled:], targets, n)
        tensors = [sampled.token_ids]
        for lp in (sampled.logprobs, prompt_lp):
            if lp is not None:
                tensors += [lp.token_ids, lp.logprobs, lp.ranks]
        batch = self.input_batch
        rows = inputs.sample_rows
        step.generations = batch.generation[rows]
        step.positions = batch.add_placeholders(rows, step.step_id)
        self._last_sampled = (step.step_id, sampled.token_ids)
        step.results = self.stager.to_host(tensors)
        step.has_sampled_lp = sampled.logprobs is not None
        step.has_prompt_lp = prompt_lp is not None

    def _add_bitmask(
        self, md: SamplingMetadata, sampled: list[str], grammar: GrammarOutput | None
    ) -> None:
        """Puts the grammar's bitmask rows of the requests `sampled` (in order) in `md`."""
        if grammar is not None and len(grammar.req_ids):
            bitmask, rows = self._grammar_rows(sampled, grammar)
            if len(bitmask):
                md.token_bitmask = self._bitmask_to_device(bitmask)
                md.token_bitmask_rows = None if rows is None else self.stager.to_device(rows)

    def _sample_spec(self, step: InFlightStep, grammar: GrammarOutput | None) -> None:
        """Samples a step with drafts and builds its output at once (`SpecDecodeSampler`)."""
        inputs, logits = step.inputs, step.logits
        layout = inputs.drafts
        assert logits is not None and layout is not None, "a step is sampled once"
        step.logits = None
        self._last_sampled = None
        sampled_ids, logprobs = self.spec_sampler.sample(
            inputs.req_ids,
            inputs.sample_mask,
            inputs.sample_rows,
            layout,
            logits[: layout.num_rows],
            grammar,
            self._add_bitmask,
            self.drafter,
        )
        prompt_lp = None
        plan = inputs.prompt_logprobs
        if plan is not None:
            targets = self.stager.to_device(plan.targets)
            n = int(self.input_batch.num_prompt_logprobs[plan.batch_rows].max())
            lp = compute_prompt_logprobs(logits[layout.num_rows :], targets, n)
            prompt_lp = HostLogprobs(*(t.cpu().numpy() for t in (lp.token_ids, lp.logprobs,
                                                                 lp.ranks)))  # fmt: skip
        step.output = ModelRunnerOutput(
            req_ids=inputs.req_ids,
            sampled_token_ids=sampled_ids,
            logprobs=logprobs,
            prompt_logprobs=self._split_prompt_logprobs(plan, prompt_lp),
        )

    def collect(self, step: InFlightStep | None) -> ModelRunnerOutput:
        """Waits for a launched step's results (the one host sync of a step) and builds its
        output; its sampled ids enter the rows still held by the same requests."""
        if step is None:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        output = step.output if step.output is not None else self._collect_sampled(step)
        if self.drafter is not None:
            inputs = step.inputs
            start = time.perf_counter()
            sampled = [inputs.req_ids[i] for i in np.flatnonzero(inputs.sample_mask).tolist()]
            output.draft_token_ids = self.drafter.propose(sampled, inputs.sample_rows, inputs)
            output.draft_time_s = time.perf_counter() - start
        return output

    def _collect_sampled(self, step: InFlightStep) -> ModelRunnerOutput:
        assert step.results is not None, "a step is sampled before it is collected"
        assert step.positions is not None and step.generations is not None
        host = iter(step.results.wait())
        token_ids = next(host)
        sampled_lp = HostLogprobs(*(next(host) for _ in range(3))) if step.has_sampled_lp else None
        prompt_lp = HostLogprobs(*(next(host) for _ in range(3))) if step.has_prompt_lp else None
        rows = step.inputs.sample_rows
        self.input_batch.fill_tokens(
            rows, step.positions, token_ids, step.generations, step.step_id
        )
        if self._last_sampled is not None and self._last_sampled[0] == step.step_id:
            self._last_sampled = None  # every id it holds is on the host now
        return self._make_output(step.inputs, token_ids, sampled_lp, prompt_lp)

    def _make_output(
        self,
        inputs: StepInputs,
        token_ids: np.ndarray,
        sampled_lp: HostLogprobs | None,
        prompt_lp: HostLogprobs | None,
    ) -> ModelRunnerOutput:
        sampled_ids: list[list[int]] = [[] for _ in inputs.req_ids]
        sample_idx = np.flatnonzero(inputs.sample_mask)
        for k, i in enumerate(sample_idx.tolist()):
            sampled_ids[i] = [int(token_ids[k])]
        logprobs: list[Logprobs | None] | None = None
        if sampled_lp is not None:
            logprobs = [None] * len(inputs.req_ids)
            num_logprobs = self.input_batch.num_logprobs[inputs.sample_rows]
            for k in np.flatnonzero(num_logprobs >= 0).tolist():
                logprobs[int(sample_idx[k])] = sampled_lp.rows(k, k + 1, int(num_logprobs[k]))
        return ModelRunnerOutput(
            req_ids=inputs.req_ids,
            sampled_token_ids=sampled_ids,
            logprobs=logprobs,
            prompt_logprobs=self._split_prompt_logprobs(inputs.prompt_logprobs, prompt_lp),
        )

    def _split_prompt_logprobs(
        self, plan: PromptLogprobsPlan | None, prompt_lp: HostLogprobs | None
    ) -> dict[str, Logprobs]:
        """The step's prompt logprobs (`prompt_lp`, in `plan`'s rows), by request."""
        out: dict[str, Logprobs] = {}
        if plan is None or prompt_lp is None:
            return out
        offset = 0
        for req_id, row, start, count in zip(
            plan.req_ids, plan.batch_rows, plan.starts, plan.counts
        ):
            n = int(self.input_batch.num_prompt_logprobs[row])
            out[req_id] = prompt_lp.rows(offset, offset + count, n, start)
            offset += count
        return out
