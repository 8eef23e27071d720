"""The Ray executor on the CPU (gloo): `LLM(tensor_parallel_size=2,
distributed_executor_backend="ray")`'s greedy tokens equal HF transformers' `generate` (fp32) on
a tiny random llama of odd shapes (one KV head replicated over the ranks, an odd vocabulary),
on a local Ray instance the executor starts itself (one node) and on a local two-node Ray
cluster (`ray.cluster_utils.Cluster`, one CPU a node: the ranks land on different nodes), and
with two pipeline stages on the two nodes; grammar bitmasks reach both ranks; an
error raised on a rank comes back as an exception; a killed actor fails the run instead of
hanging. Skipped without Ray (`pip install 'pagedllm[ray]'`)."""

from __future__ import annotations

import os
import shutil
import signal
import weakref
from collections.abc import Iterator
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")

from pagedllm import LLM, EngineArgs, SamplingParams  # noqa: E402
from pagedllm.executor import ray as ray_executor  # noqa: E402
from pagedllm.sampling_params import StructuredOutputsParams  # noqa: E402
from tests.models.harness import assert_greedy_matches_hf, save_hf_model  # noqa: E402

pytestmark = pytest.mark.slow


def _two_gpus() -> bool:
    import torch

    return torch.cuda.is_available() and torch.cuda.device_count() >= 2


RAY_TP2 = dict(tensor_parallel_size=2, distributed_executor_backend="ray", device="cpu")


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=331, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
        attention_bias=True, mlp_bias=True, tie_word_embeddings=False, initializer_range=0.25,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )  # fmt: skip
    return save_hf_model(config, tmp_path_factory.mktemp("llama_ray"), seed=7)


class Started:
    """The Ray node of each rank of every `RayExecutor` started meanwhile (the node ids its
    actors report), and weak references to the executors."""

    def __init__(self) -> None:
        self.nodes: list[list[str]] = []
        self.executors: list[weakref.ref] = []

    def end(self) -> None:
        """Shuts down the executors still alive: a dropped `LLM` can sit in a cycle that the
        engine's start-up froze (`gc.freeze`), its actors holding the cluster's CPUs."""
        for ref in self.executors:
            executor = ref()
            if executor is not None:
                executor.shutdown()


@pytest.fixture
def started(monkeypatch) -> Iterator[Started]:
    seen = Started()
    init = ray_executor.RayExecutor.__init__

    def recording_init(self, config) -> None:
        init(self, config)
        seen.nodes.append(list(self.node_ids))
        seen.executors.append(weakref.ref(self))

    monkeypatch.setattr(ray_executor.RayExecutor, "__init__", recording_init)
    yield seen
    seen.end()


def test_one_node_the_executor_starts(llama_dir: Path, started: Started, monkeypatch) -> None:
    """No cluster to join: the executor starts a local Ray instance (one node, this machine's
    CPUs) and both ranks run on it."""
    if ray.is_initialized():
        ray.shutdown()
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    try:
        assert_greedy_matches_hf(llama_dir, regimes=("plain",), **RAY_TP2)
        assert len(ray.nodes()) == 1
        [nodes] = started.nodes
        assert len(nodes) == 2 and len(set(nodes)) == 1
    finally:
        started.end()
        ray.shutdown()


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs two CUDA devices")
def test_tp2_on_two_gpus_equals_hf(llama_dir: Path, started: Started) -> None:
    """On CUDA (NCCL): a local Ray instance with the machine's GPUs, a GPU bundle per rank."""
    if ray.is_initialized():
        ray.shutdown()
    try:
        assert_greedy_matches_hf(llama_dir, regimes=("plain",), **{**RAY_TP2, "device": "cuda"})
        [nodes] = started.nodes
        assert len(nodes) == 2 and len(set(nodes)) == 1
    finally:
        started.end()
        ray.shutdown()


@pytest.fixture(scope="module")
def two_nodes() -> Iterator[list[str]]:
    """A local Ray cluster of two nodes of one CPU each; its node ids."""
    from ray.cluster_utils import Cluster

    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    try:
        cluster.add_node(num_cpus=1, num_gpus=0)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address)
        os.environ["RAY_ADDRESS"] = cluster.address  # for the server's engine-core process
        yield [n["NodeID"] for n in ray.nodes() if n["Alive"]]
    finally:
        os.environ.pop("RAY_ADDRESS", None)
        ray.shutdown()
        cluster.shutdown()


def test_tp2_on_two_nodes_equals_hf(
    llama_dir: Path, two_nodes, started: Started, monkeypatch
) -> None:
    """Each call's payload through the object store (`PUT_BYTES` 0; the one-node test sends
    them inline)."""
    monkeypatch.setattr(ray_executor, "PUT_BYTES", 0)
    assert len(two_nodes) == 2
    assert_greedy_matches_hf(llama_dir, regimes=("plain",), **RAY_TP2)
    [nodes] = started.nodes
    assert sorted(nodes) == sorted(two_nodes), "one rank on each node"


def test_pp2_stages_on_two_nodes_equal_hf(llama_dir: Path, two_nodes, started: Started) -> None:
    """A pipeline stage on each node: the activations go node to node."""
    assert_greedy_matches_hf(
        llama_dir,
        regimes=("plain",),
        pipeline_parallel_size=2,
        distributed_executor_backend="ray",
        device="cpu",
    )
    [nodes] = started.nodes
    assert sorted(nodes) == sorted(two_nodes)


def test_grammar_bitmasks_travel_in_the_call(tmp_path: Path, two_nodes) -> None:
    """Constrained requests at tp 2 on two nodes (sampled, T = 1): every output is a choice."""
    from tests.tiny_models import make_model

    path = make_model("llama", tmp_path / "llama")
    llm = LLM(str(path), dtype="float32", kv_cache_memory="64MiB", **RAY_TP2)
    try:
        choices = ["alpha", "beta gamma", "delta"]
        params = SamplingParams(
            temperature=1.0,
            max_tokens=20,
            seed=3,
            structured_outputs=StructuredOutputsParams(choice=choices),
        )
        outs = llm.generate(["pick one:"] * 4, [params] * 4, use_tqdm=False)
        assert all(o.outputs[0].text in choices for o in outs), [o.outputs[0].text for o in outs]
    finally:
        llm.llm_engine.engine_core.shutdown()


def test_server_joins_the_cluster_of_ray_address(tiny_model_dirs, two_nodes, tmp_path) -> None:
    """`pagedllm serve --distributed-executor-backend ray`: its engine-core process joins the
    cluster `RAY_ADDRESS` names; greedy completions equal HF's."""
    from ray.util import placement_group_table
    from transformers import AutoTokenizer

    from tests.entrypoints.conftest import RemoteServer, httpx, tiny_server_args
    from tests.tiny_models import hf_greedy, load_hf

    path = tiny_model_dirs["llama"]
    args = tiny_server_args(path, tmp_path, "--served-model-name", "tiny-ray", "--device", "cpu")
    args += ["--tensor-parallel-size", "2", "--distributed-executor-backend", "ray"]
    server = RemoteServer(args, api_key=None)
    try:
        prompts = [[5, 17, 230, 9], [44] * 21]
        expected = hf_greedy(load_hf(Path(path)), prompts, [10, 10])
        tokenizer = AutoTokenizer.from_pretrained(path)
        for prompt, want in zip(prompts, expected, strict=True):
            r = httpx.post(
                server.url("/v1/completions"),
                json={"model": "tiny-ray", "prompt": prompt, "max_tokens": 10, "temperature": 0,
                      "ignore_eos": True},
                timeout=120,
            )  # fmt: skip
            assert r.status_code == 200, r.text
            text = r.json()["choices"][0]["text"]
            assert text == tokenizer.decode(want, skip_special_tokens=True)
        # The server's placement group, seen from this driver: a bundle on each node.
        [group] = [g for g in placement_group_table().values() if g["state"] == "CREATED"]
        assert sorted(group["bundles_to_node_id"].values()) == sorted(two_nodes)
    finally:
        server.stop()


def test_an_error_on_a_rank_comes_back(llama_dir: Path, two_nodes) -> None:
    """Too few KV blocks for one max_model_len request: each rank raises, the driver too."""
    config = EngineArgs(
        str(llama_dir), dtype="float32", skip_tokenizer_init=True, max_model_len=256,
        num_gpu_blocks_override=2, **RAY_TP2,
    ).create_engine_config()  # fmt: skip
    executor = ray_executor.RayExecutor(config)
    try:
        with pytest.raises(RuntimeError, match=r"worker rank \d: ValueError: .*max_model_len"):
            executor.determine_num_blocks()
        # The other rank's error of that call is not raised again: the ranks are in step.
        specs = executor.kv_cache_specs()
        assert sorted(specs) == [f"model.layers.{i}.self_attn.attn" for i in range(2)]
    finally:
        executor.shutdown()


def test_a_rank_that_fails_to_start_fails_the_executor(
    llama_dir: Path, two_nodes, tmp_path: Path
) -> None:
    """The checkpoint is gone when the ranks load it: the start-up error, and the cluster's CPUs
    free again (the next executor is placed)."""
    model = tmp_path / "model"
    shutil.copytree(llama_dir, model)
    config = EngineArgs(
        str(model), dtype="float32", skip_tokenizer_init=True, max_model_len=256, **RAY_TP2
    ).create_engine_config()
    for weights in model.glob("*.safetensors"):
        weights.unlink()
    with pytest.raises(ray_executor.WorkerDiedError, match=r"worker rank \d failed to start"):
        ray_executor.RayExecutor(config)


def test_killed_actor_fails_the_run_without_hanging(llama_dir: Path, two_nodes) -> None:
    llm = LLM(
        str(llama_dir), dtype="float32", skip_tokenizer_init=True, kv_cache_memory="64MiB",
        max_model_len=256, **RAY_TP2,
    )  # fmt: skip
    executor = llm.llm_engine.engine_core.executor
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    try:
        assert len(llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)) == 1
        os.kill(ray.get(executor.workers[1].pid.remote()), signal.SIGKILL)
        with pytest.raises(ray_executor.WorkerDiedError, match="worker rank 1"):
            llm.generate([{"prompt_token_ids": [5, 6, 7]}], params, use_tqdm=False)
    finally:
        llm.llm_engine.engine_core.shutdown()
    assert not executor.workers
