"""The Triton GEMV (pagedllm/layers/gemv_kernels.py) against `F.linear`, and its dispatch.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (set before triton is
imported; tests/triton_interpreter.py fixes its scalar loop bounds, bf16 `tl.dot` and bf16
rounding). The reference is `F.linear` in fp32 on the same (rounded) inputs: the kernel
accumulates in fp32 and rounds once, so it may differ by half a rounding step of the output
dtype (relative `2^-8` in bf16, `2^-11` in fp16) plus the fp32 summation order (`ATOL`).
On a GPU, `gpu`-marked tests also run the serving shapes in bf16 and under a CUDA graph.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch.nn import functional as F

from tests.triton_interpreter import kernel_test_device

DEVICE = kernel_test_device()  # NOTE: before triton is first imported

from pagedllm.benchmarks import gemv as gemv_bench  # noqa: E402
from pagedllm.layers import embedding, fused, gemv_kernels, linear  # noqa: E402
from pagedllm.layers.activation import SiluAndMul  # noqa: E402
from pagedllm.layers.gemv_kernels import GemvConfig  # noqa: E402
from tests.triton_interpreter import patch_interpreter  # noqa: E402

if DEVICE == "cpu":
    patch_interpreter()

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Half a rounding step of the output, relative (fp32: its summation order).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 2**-8, torch.float16: 2**-11}
ATOL = 1e-5


def _inputs(m: int, n: int, k: int, dtype: torch.dtype, seed: int, x_cols: int | None = None):
    """x, weight, bias scaled so outputs are O(1), rounded to `dtype`, on DEVICE."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, x_cols or k, generator=gen) * k**-0.25
    w = torch.randn(n, k, generator=gen) * k**-0.25
    b = torch.randn(n, generator=gen)
    return [t.to(dtype).to(DEVICE) for t in (x, w, b)]


def _reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x.cpu().double(), w.cpu().double(), None if b is None else b.cpu().double())


def _close(y: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, atol: float = ATOL) -> None:
    assert y.dtype == dtype and y.shape == ref.shape
    torch.testing.assert_close(y.cpu().double(), ref, rtol=RTOL[dtype], atol=atol)


def _silu_and_mul_reference(gate_up: torch.Tensor) -> torch.Tensor:
    """The layer's eager path in the input dtype (SiLU rounds, then the product does)."""
    return SiluAndMul()(gate_up.cpu())


# NOTE: under the interpreter the kernel's SiLU rounds exactly as torch's (measured: no slack
# needed); compiled, its fp32 exp may differ from torch's by an ulp, so a few activation elements
# may round to the other neighbour, each moving an output by one rounding step of it times |w|.
SILU_FLIPS = 0 if DEVICE == "cpu" else 4


def _silu_atol(act: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> float:
    if dtype == torch.float32:
        return ATOL
    step = 2 * RTOL[dtype] * act.abs().max().item()
    return ATOL + SILU_FLIPS * step * w.abs().max().item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 2, 3, 8])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_matches_linear(dtype: torch.dtype, m: int, bias: bool) -> None:
    """N and K not multiples of any block; the default config (elementwise up to 4 rows, then
    tl.dot)."""
    x, w, b = _inputs(m, 37, 100, dtype, seed=m + 10 * bias)
    b = b if bias else None
    _close(gemv_kernels.gemv(x, w, b), _reference(x, w, b), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("m", [1, 3, 8])
def test_gemv_silu_mul_matches_linear_of_silu_and_mul(dtype: torch.dtype, m: int) -> None:
    k = 100
    gate_up, w, b = _inputs(m, 37, k, dtype, seed=7 * m, x_cols=2 * k)
    gate_up = gate_up * 3  # through SiLU's curved part
    act = _silu_and_mul_reference(gate_up)
    atol = _silu_atol(act, w, dtype)
    _close(gemv_kernels.gemv_silu_mul(gate_up, w, b), _reference(act, w, b), dtype, atol)


CONFIGS = [
    GemvConfig(block_n=2, block_k=16),  # many programs, many K tiles
    GemvConfig(block_n=64, block_k=128, num_warps=8),  # one program past N, one masked tile
    GemvConfig(block_n=8, block_k=32, split_k=3),  # uneven split: the last split is short
    GemvConfig(block_n=8, block_k=64, split_k=2),  # even split
    GemvConfig(block_n=16, block_k=32, dot=True),
    GemvConfig(block_n=32, block_k=64, split_k=4, dot=True),
]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize(("dtype", "m"), [(torch.float32, 3), (torch.bfloat16, 1)])
def test_configs(cfg: GemvConfig, dtype: torch.dtype, m: int) -> None:
    """Every launch shape the sweep may put in the table, plain and fused, with a bias."""
    n, k = 45, 256 + 44
    x, w, b = _inputs(m, n, k, dtype, seed=cfg.block_n * cfg.block_k)
    _close(gemv_kernels.gemv(x, w, b, config=cfg), _reference(x, w, b), dtype)
    gate_up = torch.cat([x, x.flip(0)], dim=-1)
    act = _silu_and_mul_reference(gate_up)
    y = gemv_kernels.gemv_silu_mul(gate_up, w, b, config=cfg)
    _close(y, _reference(act, w, b), dtype, _silu_atol(act, w, dtype))


@pytest.mark.parametrize("silu", [False, True])
def test_split_k_rounding_leaves_no_empty_split(silu: bool) -> None:
    """K = 6 tiles over 4 splits: rounded up to 2 tiles each, a fourth split would be empty and
    (the launch being EVEN_K) read past K unmasked; it found wrong sums in the GPU sweep."""
    cfg = GemvConfig(block_n=2, block_k=32, split_k=4)
    x, w, b = _inputs(1, 9, 192, torch.float32, seed=11)
    # Inputs are views into wider rows, so anything read past K is nonzero.
    x = torch.cat([x, torch.ones_like(x)], dim=-1)[:, :192]
    if silu:
        gate_up = torch.cat([x, -x, torch.ones_like(x)], dim=-1)[:, :384] * 3
        act = _silu_and_mul_reference(gate_up)
        y = gemv_kernels.gemv_silu_mul(gate_up, w, b, config=cfg)
        _close(y, _reference(act, w, b), torch.float32, _silu_atol(act, w, torch.float32))
    else:
        _close(gemv_kernels.gemv(x, w, b, config=cfg), _reference(x, w, b), torch.float32)


def test_leading_dims_and_strided_rows() -> None:
    x, w, _ = _inputs(6, 20, 48, torch.float32, seed=3)
    y = gemv_kernels.gemv(x.view(2, 3, 48), w)
    assert y.shape == (2, 3, 20)
    _close(y.reshape(6, 20), _reference(x, w, None), torch.float32)
    wide = torch.cat([x, x], dim=-1)[:, :48]  # rows strided, last dim contiguous
    _close(gemv_kernels.gemv(wide, w), _reference(x, w, None), torch.float32)


def test_supports() -> None:
    x, w, b = _inputs(4, 16, 32, torch.float16, seed=1)
    assert gemv_kernels.supports(x, w, b)
    assert gemv_kernels.supports(torch.cat([x, x], -1), w, b, silu_mul=True)
    assert not gemv_kernels.supports(torch.cat([x, x], -1), w, b)
    assert not gemv_kernels.supports(x, w[:, :31])  # K differs
    assert not gemv_kernels.supports(x, torch.empty(32, 16, dtype=w.dtype, device=DEVICE).t())
    assert not gemv_kernels.supports(x.float(), w)  # dtypes differ
    assert not gemv_kernels.supports(x, w, b[:8])
    assert not gemv_kernels.supports(x[:0], w)  # no rows
    big = x.new_zeros(gemv_kernels.MAX_M + 1, 32)
    assert not gemv_kernels.supports(big, w)
    ints = torch.zeros(2, 32, dtype=torch.int32, device=DEVICE)
    assert not gemv_kernels.supports(ints, ints.new_zeros(16, 32))
    with pytest.raises(ValueError, match="gemv does not support"):
        gemv_kernels.gemv(big, w)
    with pytest.raises(ValueError, match=r"need a tl\.dot config"):
        gemv_kernels.gemv(x.new_zeros(5, 32), w, config=GemvConfig(4, 32))
    with pytest.raises(ValueError, match="blocks of at least 16"):
        gemv_kernels.gemv(x, w, config=GemvConfig(8, 32, dot=True))


def test_config_table_lookup(monkeypatch: pytest.MonkeyPatch) -> None:
    plain4, plain8, silu1 = GemvConfig(4, 256), GemvConfig(32, 256, dot=True), GemvConfig(8, 512)
    table = {("", 64, 128, 4): plain4, ("", 64, 128, 8): plain8, ("silu_mul", 64, 128, 1): silu1}
    monkeypatch.setattr(gemv_kernels, "_TABLE", table)
    gemv_kernels._config.cache_clear()
    try:
        bf16 = torch.bfloat16
        assert gemv_kernels._config(1, 64, 128, bf16) == plain4  # next larger swept M
        assert gemv_kernels._config(4, 64, 128, bf16) == plain4
        assert gemv_kernels._config(5, 64, 128, torch.float16) == plain8
        default = gemv_kernels._default_config(9, 64, 128, bf16)
        assert gemv_kernels._config(9, 64, 128, bf16) == default
        assert gemv_kernels._config(1, 64, 128, bf16, "silu_mul") == silu1
        assert gemv_kernels._config(2, 64, 128, bf16, "silu_mul") == plain4  # plain's entry
        assert gemv_kernels._config(1, 64, 128, torch.float32) != plain4  # table is 2-byte
        assert gemv_kernels._config(1, 64, 256, bf16) == gemv_kernels._default_config(
            1, 64, 256, bf16
        )
    finally:
        gemv_kernels._config.cache_clear()


class _Spy:
    """Counts calls of a gemv_kernels function, still running it."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, name: str) -> None:
        self.calls = 0
        fn = getattr(gemv_kernels, name)

        def wrapped(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.calls += 1
            return fn(*args, **kwargs)

        monkeypatch.setattr(gemv_kernels, name, wrapped)


@pytest.fixture
def gemv_on(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """The dispatch as on a GPU: interpreter tensors count as CUDA ones."""
    if DEVICE == "cpu":
        monkeypatch.setattr(fused, "enabled", lambda x, switch=None: True)
    monkeypatch.delenv("PAGEDLLM_GEMV", raising=False)
    fused.gemv_enabled.cache_clear()
    yield monkeypatch
    fused.gemv_enabled.cache_clear()


def _layer(cls, *args, dtype=torch.bfloat16, seed=0, scale=0.2, **kwargs):  # type: ignore[no-untyped-def]
    layer = cls(*args, **kwargs).to(DEVICE)
    gen = torch.Generator().manual_seed(seed)
    for p in layer.parameters():
        p.data = (torch.randn(p.shape, generator=gen) * scale).to(dtype).to(DEVICE)
    return layer


@pytest.mark.parametrize(
    "cls", [linear.ReplicatedLinear, linear.ColumnParallelLinear, linear.RowParallelLinear]
)
def test_dispatch_small_m_takes_gemv(cls, gemv_on: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """One row always takes the GEMV; 2-4 rows only where the table says it wins; more never."""
    spy = _Spy(gemv_on, "gemv")
    layer = _layer(cls, 40, 24, bias=True)
    x = (torch.randn(1, 1, 40) * 0.5).to(torch.bfloat16).to(DEVICE)
    _close(layer(x), _reference(x, layer.weight, layer.bias).view(1, 1, 24), torch.bfloat16)
    assert spy.calls == 1
    three = (torch.randn(3, 40) * 0.5).to(torch.bfloat16).to(DEVICE)
    assert torch.equal(layer(three), F.linear(three, layer.weight, layer.bias))
    assert spy.calls == 1, "a shape the table does not list: cuBLAS from 2 rows"
    table = {**gemv_kernels._TABLE, ("", 24, 40, 4): GemvConfig(block_n=4, block_k=16)}
    gemv_on.setattr(gemv_kernels, "_TABLE", table)
    gemv_kernels.wins.cache_clear()
    _close(layer(three), _reference(three, layer.weight, layer.bias), torch.bfloat16)
    assert spy.calls == 2, "listed for 4 rows: 3 rows take the GEMV"
    big = (torch.randn(linear.GEMV_MAX_M + 1, 40) * 0.5).to(torch.bfloat16).to(DEVICE)
    assert torch.equal(layer(big), F.linear(big, layer.weight, layer.bias))
    assert spy.calls == 2, "more than GEMV_MAX_M rows take F.linear"
    gemv_kernels.wins.cache_clear()


def test_dispatch_env_off_and_cpu(gemv_on: pytest.MonkeyPatch) -> None:
    spy = _Spy(gemv_on, "gemv")
    layer = _layer(linear.QKVParallelLinear, 32, 8, 4, 2, bias=True)
    x = torch.randn(1, 32).to(torch.bfloat16).to(DEVICE)
    gemv_on.setenv("PAGEDLLM_GEMV", "0")
    fused.gemv_enabled.cache_clear()
    assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
    assert spy.calls == 0
    if DEVICE == "cpu":  # the real `enabled`: CPU tensors never reach Triton
        gemv_on.undo()
        fused.gemv_enabled.cache_clear()
        spy = _Spy(gemv_on, "gemv")
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
        assert spy.calls == 0


def test_forward_silu_mul(gemv_on: pytest.MonkeyPatch) -> None:
    fused_spy = _Spy(gemv_on, "gemv_silu_mul")
    layer = _layer(linear.RowParallelLinear, 48, 16, bias=True, seed=2)
    gate_up = torch.randn(1, 96).to(torch.bfloat16).to(DEVICE)
    act = _silu_and_mul_reference(gate_up)
    atol = _silu_atol(act, layer.weight, torch.bfloat16)
    y = layer.forward_silu_mul(gate_up)
    _close(y, _reference(act, layer.weight, layer.bias), torch.bfloat16, atol)
    assert fused_spy.calls == 0, "no table entry: SiLU-and-mul, then the plain GEMV"
    table = {**gemv_kernels._TABLE, ("silu_mul", 16, 48, 1): GemvConfig(block_n=4, block_k=16)}
    gemv_on.setattr(gemv_kernels, "_TABLE", table)
    gemv_kernels.wins.cache_clear()
    y = layer.forward_silu_mul(gate_up)
    _close(y, _reference(act, layer.weight, layer.bias), torch.bfloat16, atol)
    assert fused_spy.calls == 1, "listed: one fused launch"
    big = torch.randn(linear.GEMV_MAX_M + 1, 96).to(torch.bfloat16).to(DEVICE)
    expected = F.linear(SiluAndMul()(big), layer.weight, layer.bias)
    assert torch.equal(layer.forward_silu_mul(big), expected)
    assert fused_spy.calls == 1
    gemv_kernels.wins.cache_clear()


def test_lm_head_logits_take_gemv(gemv_on: pytest.MonkeyPatch) -> None:
    spy = _Spy(gemv_on, "gemv")
    head = _layer(embedding.ParallelLMHead, 50, 24, seed=4)
    hidden = torch.randn(1, 24).to(torch.bfloat16).to(DEVICE)
    _close(head.compute_logits(hidden), _reference(hidden, head.weight, None), torch.bfloat16)
    assert spy.calls == 1


def test_benchmark_script_runs_and_prints_a_table(capsys: pytest.CaptureFixture[str]) -> None:
    """The GPU benchmark's logic on tiny shapes under the interpreter (or on the GPU)."""
    device = ["--device", "cpu"] if DEVICE == "cpu" else []
    gemv_bench.main([*device, "--tiny", "--sweep", "--m", "1,4"])
    out = capsys.readouterr().out
    assert "WRONG RESULT" not in out
    literal = out[out.index("_TABLE: dict") :].split("=", 1)[1]
    table = eval(literal, {"GemvConfig": GemvConfig})
    assert set(table) == {(act, 40, 96, m) for act in ("", "silu_mul") for m in (1, 4)}
    assert all(isinstance(c, GemvConfig) for c in table.values())


def test_sweep_candidates() -> None:
    """A tight grid; elementwise only up to 4 rows, at conversion-free widths and <= 64
    accumulators per thread; every config launchable."""
    for m in (1, 2, 3, 4, 8, 16):
        cands = gemv_bench.candidates(m, 4096, GemvConfig)
        assert 8 <= len(cands) <= 30 and len(set(cands)) == len(cands)
        pad = 1 << (m - 1).bit_length()
        for c in cands:
            assert c.dot or m <= gemv_kernels.MAX_ELEMENTWISE_M
            if c.dot:
                assert min(c.block_n, c.block_k) >= 16
            else:
                assert c.block_k % (8 * 32 * c.num_warps) == 0
                assert pad * c.block_n * c.block_k // (32 * c.num_warps) <= 64
    assert all(c.block_k <= 1024 for c in gemv_bench.candidates(1, 1024, GemvConfig))


# --- GPU: serving shapes in bf16 ---------------------------------------------------------

SERVING = [(4096, 6144), (4096, 4096), (14336, 4096), (1024, 151936), (2048, 1024)]


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize(("k", "n"), SERVING)
@pytest.mark.parametrize("m", [1, 2, 3, 4, 8])
def test_serving_shapes_bf16(k: int, n: int, m: int) -> None:
    dt = torch.bfloat16
    x, w, _ = _inputs(m, n, k, dt, seed=k + n + m)
    _close(gemv_kernels.gemv(x, w), _reference(x, w, None), dt, atol=1e-4)
    gate_up = torch.randn(m, 2 * k, device="cuda", dtype=dt)
    act = SiluAndMul()(gate_up)  # the fused Triton silu_and_mul
    y = gemv_kernels.gemv_silu_mul(gate_up, w)
    _close(y, F.linear(act.double(), w.double()).cpu(), dt, _silu_atol(act, w, dt))


@pytest.mark.gpu
@gpu
def test_dispatch_under_cuda_graph() -> None:
    """Decode linears captured in a CUDA graph replay the GEMV on new inputs."""
    mlp_in = _layer(linear.MergedColumnParallelLinear, 512, [1024, 1024], seed=5, scale=512**-0.5)
    down = _layer(linear.RowParallelLinear, 1024, 512, seed=6, scale=1024**-0.5)
    x = torch.randn(4, 512, device="cuda", dtype=torch.bfloat16)
    fused.gemv_enabled.cache_clear()

    def step() -> torch.Tensor:
        return down.forward_silu_mul(mlp_in(x))

    step()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step()
    x.copy_(torch.randn_like(x))
    graph.replay()
    expected = F.linear(SiluAndMul()(F.linear(x, mlp_in.weight)), down.weight)
    # O(1) values; the two paths round the gate_up output differently (by <= 1 bf16 step each).
    torch.testing.assert_close(out.float(), expected.float(), rtol=2e-2, atol=5e-2)
