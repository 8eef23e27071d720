"""ModelRunner: SchedulerOutput → flat inputs → model → sampler → ModelRunnerOutput.

All scheduled tokens of all requests run as one flat batch (no padding, no batch dimension);
logits are computed only for the last row of each request that reaches the end of its known
tokens (a prompt chunk that stops short samples nothing).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from pagedllm.attention.backend import AttentionMetadata
from pagedllm.attention.layer import Attention
from pagedllm.config import EngineConfig
from pagedllm.engine.scheduler_output import ModelRunnerOutput, SchedulerOutput
from pagedllm.forward_context import set_forward_context
from pagedllm.models.interface import CausalLM
from pagedllm.utils import cdiv
from pagedllm.worker.input_batch import InputBatch
from pagedllm.worker.sampler import Sampler, SamplingMetadata


@dataclass
class StepInputs:
    """One step's flat model inputs, on the device."""

    req_ids: list[str]
    input_ids: torch.Tensor
    positions: torch.Tensor
    attn_metadata: AttentionMetadata
    logits_indices: torch.Tensor  # rows of the hidden states that sample
    sample_rows: np.ndarray  # input-batch rows of the requests that sample, in logits order
    sample_mask: np.ndarray  # bool [num_reqs]: which scheduled requests sample


class ModelRunner:
    def __init__(self, config: EngineConfig, model: CausalLM, device: torch.device) -> None:
        self.config = config
        self.model = model
        self.device = device
        self.block_size = config.cache_config.block_size
        max_model_len = config.model_config.max_model_len
        self.input_batch = InputBatch(
            max_num_reqs=config.scheduler_config.max_num_seqs,
            max_model_len=max_model_len,
            max_blocks_per_req=cdiv(max_model_len, self.block_size),
        )
        self.sampler = Sampler()
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(config.model_config.seed)
        self.kv_caches: list[torch.Tensor] = []
        self.attention_layers = [m for m in model.modules() if isinstance(m, Attention)]

    def bind_kv_caches(self, kv_caches: list[torch.Tensor]) -> None:
        assert len(kv_caches) == len(self.attention_layers)
        self.kv_caches = kv_caches
        for layer, cache in zip(self.attention_layers, kv_caches):
            layer.kv_cache = cache

    # ----- state updates -----

    def _update_states(self, out: SchedulerOutput) -> None:
        batch = self.input_batch
        for req_id in out.finished_req_ids | out.preempted_req_ids:
            batch.remove_request(req_id)
        for new in out.scheduled_new_reqs:
            batch.add_request(
                new.req_id,
                new.prompt_token_ids + new.output_token_ids,
                new.block_ids,
                new.sampling_params,
            )
        for cached in out.scheduled_cached_reqs:
            batch.append_block_ids(batch.req_to_row[cached.req_id], cached.new_block_ids)

    # ----- inputs -----

    def _prepare_inputs(self, out: SchedulerOutput) -> StepInputs:
        batch = self.input_batch
        req_ids = list(out.num_scheduled_tokens)
        rows = np.fromiter((batch.req_to_row[r] for r in req_ids), np.int64, len(req_ids))
        query_lens = np.fromiter(out.num_scheduled_tokens.values(), np.int64, len(req_ids))
        starts = self._num_computed(out, req_ids)
        seq_lens = starts + query_lens
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
        query_start_loc = np.zeros(len(req_ids) + 1, dtype=np.int32)
        query_start_loc[1:] = cu

        sample_mask = seq_lens == batch.num_tokens[rows]
        logits_indices = (cu - 1)[sample_mask]

        dev = self.device
        qsl_cpu = torch.from_numpy(query_start_loc)
        seq_lens_cpu = torch.from_numpy(seq_lens.astype(np.int32))
        metadata = AttentionMetadata(
            num_reqs=len(req_ids),
            num_actual_tokens=num_tokens,
            max_query_len=int(query_lens.max()),
            max_seq_len=int(seq_lens.max()),
            query_start_loc=_to(qsl_cpu, dev),
            seq_lens=_to(seq_lens_cpu, dev),
            block_table=_to(torch.from_numpy(np.ascontiguousarray(block_table)), dev),
            slot_mapping=_to(torch.from_numpy(slot_mapping), dev),
            query_start_loc_cpu=qsl_cpu,
            seq_lens_cpu=seq_lens_cpu,
        )
        return StepInputs(
            req_ids=req_ids,
            input_ids=_to(torch.from_numpy(input_ids), dev),
            positions=_to(torch.from_numpy(positions), dev),
            attn_metadata=metadata,
            logits_indices=_to(torch.from_numpy(logits_indices), dev),
            sample_rows=rows[sample_mask],
            sample_mask=sample_mask,
        )

    @staticmethod
    def _num_computed(out: SchedulerOutput, req_ids: list[str]) -> np.ndarray:
        computed = {r.req_id: r.num_computed_tokens for r in out.scheduled_new_reqs}
        computed.update((r.req_id, r.num_computed_tokens) for r in out.scheduled_cached_reqs)
        return np.fromiter((computed[r] for r in req_ids), np.int64, len(req_ids))

    def _sampling_metadata(self, rows: np.ndarray) -> SamplingMetadata:
        temperature = self.input_batch.temperature[rows]
        return SamplingMetadata(
            temperature=_to(torch.from_numpy(temperature), self.device),
            all_greedy=bool((temperature == 0).all()),
            all_random=bool((temperature != 0).all()),
            generator=self.generator,
        )

    # ----- the step -----

    @torch.inference_mode()
    def execute_model(self, out: SchedulerOutput) -> ModelRunnerOutput:
        self._update_states(out)
        if out.is_empty:
            return ModelRunnerOutput(req_ids=[], sampled_token_ids=[])
        inputs = self._prepare_inputs(out)
        with set_forward_context(inputs.attn_metadata):
            hidden = self.model(inputs.input_ids, inputs.positions)
        logits = self.model.compute_logits(hidden[inputs.logits_indices])
        sampled = self.sampler(logits, self._sampling_metadata(inputs.sample_rows))
        # NOTE: the one host sync of the step.
        token_ids = sampled.token_ids.cpu().numpy()
        logprobs = sampled.logprobs.cpu().numpy()
        self.input_batch.append_tokens(inputs.sample_rows, token_ids)

        sampled_ids: list[list[int]] = [[] for _ in inputs.req_ids]
        sampled_logprobs: list[list[float]] = [[] for _ in inputs.req_ids]
        for k, i in enumerate(np.flatnonzero(inputs.sample_mask)):
            sampled_ids[i] = [int(token_ids[k])]
            sampled_logprobs[i] = [float(logprobs[k])]
        return ModelRunnerOutput(
            req_ids=inputs.req_ids,
            sampled_token_ids=sampled_ids,
            sampled_logprobs=sampled_logprobs,
        )


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type == "cpu":
        return t
    return t.pin_memory().to(device, non_blocking=True)
