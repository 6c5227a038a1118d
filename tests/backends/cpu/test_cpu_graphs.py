"""The CPU backend's graphs: decode steps recorded as programs of its C kernels and replayed in C.

A recorded bucket must compute what the eager step computes on every later input (the kernels
read the static buffers each replay), the whole model must decode exactly as the plain reference
backend does, and anything a program would miss (a torch op, the int8 kernel, a bucket past the
recorded sizes) must make the step replay eagerly instead, saying why.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from xllm import LLM, SamplingParams
from xllm.backends.cpu.graphs import GRAPH_MAX_ROWS, CpuGraphRunner
from xllm.hal import GraphInput


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_a_recorded_step_replays_its_kernels_on_each_new_input(cpu, cpu_kernels) -> None:
    g = _gen(1)
    table, norm_w, w = (
        torch.randn(50, 32, generator=g),
        torch.rand(32, generator=g),
        torch.randn(24, 32, generator=g),
    )

    def step(backend):
        def fn(ids: torch.Tensor) -> torch.Tensor:
            return backend.linear(backend.rms_norm(backend.embedding(ids, table), norm_w, 1e-6), w)

        return fn

    runner = cpu_kernels.create_graph_runner(
        step(cpu_kernels), {"ids": GraphInput(torch.int64)}, capture_sizes=[1, 4]
    )
    assert isinstance(runner, CpuGraphRunner)
    first = None
    for ids in ([3], [7, 8, 9], [49], [0, 1, 2, 3]):
        batch = torch.tensor(ids)
        out = runner.run(ids=batch)
        torch.testing.assert_close(out, step(cpu)(batch), rtol=1e-5, atol=1e-5)
        first = out if first is None else first
    assert runner.is_recorded(1) and runner.is_recorded(4) and runner.eager_reason is None
    # An id out of range stops the replay; the step runs eagerly and the reference op raises.
    with pytest.raises(IndexError):
        runner.run(ids=torch.tensor([50]))
    torch.testing.assert_close(runner.run(ids=torch.tensor([5])), step(cpu)(torch.tensor([5])))


def test_a_torch_op_outside_the_kernels_makes_steps_replay_eagerly(cpu_kernels) -> None:
    runner = cpu_kernels.create_graph_runner(
        lambda x: x * 2, {"x": GraphInput(torch.float32, (2,))}, capture_sizes=[2]
    )
    assert runner.run(x=torch.full((2, 2), 3.0)).tolist() == [[6.0, 6.0]] * 2
    assert runner.run(x=torch.full((1, 2), 4.0)).tolist() == [[8.0, 8.0]]  # not a stale recording
    assert not runner.is_recorded(2) and "aten.mul" in runner.eager_reason


def test_buckets_past_the_recorded_sizes_replay_eagerly(cpu_kernels) -> None:
    w = torch.randn(8, 8, generator=_gen(2))
    big = GRAPH_MAX_ROWS * 2
    runner = cpu_kernels.create_graph_runner(
        lambda x: cpu_kernels.linear(x, w), {"x": GraphInput(torch.float32, (8,))}, capture_sizes=[1, big]
    )
    x = torch.randn(GRAPH_MAX_ROWS + 1, 8, generator=_gen(3))
    torch.testing.assert_close(runner.run(x=x), x @ w.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runner.run(x=x[:1]), x[:1] @ w.T, rtol=1e-5, atol=1e-5)
    assert runner.is_recorded(1) and not runner.is_recorded(big) and runner.eager_reason is None


def _decode(model: Path, **kwargs) -> tuple[list[list[int]], LLM]:
    llm = LLM(str(model), dtype="float32", max_model_len=256, **kwargs)
    prompts = [[5 + (i * 11 + j * 7) % 200 for j in range(3 + 13 * i)] for i in range(6)]
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    batch = [o.outputs[0].token_ids for o in llm.generate(prompts, params, use_tqdm=False)]
    alone = [llm.generate([p], params, use_tqdm=False)[0].outputs[0].token_ids for p in prompts[:2]]
    return batch + alone, llm


def test_the_model_decodes_as_the_plain_reference_does(tiny_llama_dir: Path) -> None:
    got, llm = _decode(tiny_llama_dir)
    runner = llm.engine.runner.graph_runner
    if not isinstance(runner, CpuGraphRunner):
        pytest.skip("no C compiler here: the CPU backend runs its plain ops only")
    # Six prompts decode in bucket 6: the CPU records every size up to 16 (no padding rows).
    assert runner.eager_reason is None and runner.is_recorded(1) and runner.is_recorded(6)
    want, _ = _decode(tiny_llama_dir, backend="cpu", backend_options={"kernels": False})
    assert got == want


def test_int8_weights_are_recorded_too_and_decode_as_eagerly(tiny_llama_dir: Path) -> None:
    got, llm = _decode(tiny_llama_dir, quantization="int8")
    runner = llm.engine.runner.graph_runner
    if not isinstance(runner, CpuGraphRunner):
        pytest.skip("no C compiler here: the CPU backend runs its plain ops only")
    assert runner.eager_reason is None and runner.is_recorded(1)
    want, _ = _decode(tiny_llama_dir, quantization="int8", use_graphs=False)
    assert got == want


def test_the_int8_gemm_path_is_not_recorded_and_says_so(cpu_kernels, monkeypatch: pytest.MonkeyPatch) -> None:
    from xllm.backends.cpu import quant_linear
    from xllm.hal.backend import quantize_int8

    monkeypatch.setattr(quant_linear, "_DIRECT_MAX_ROWS", 2)  # 4 rows take the GEMM path
    q, s = quantize_int8(torch.randn(64, 64, generator=_gen(5)), 32)
    runner = cpu_kernels.create_graph_runner(
        lambda x: cpu_kernels.linear_int8(x, q, s, None, 32),
        {"x": GraphInput(torch.float32, (64,))},
        capture_sizes=[4],
    )
    for seed in (6, 7):
        x = torch.randn(4, 64, generator=_gen(seed))
        torch.testing.assert_close(runner.run(x=x), x @ (q.float() * s.repeat_interleave(32, dim=1)).T)
    assert not runner.is_recorded(4) and "GEMM path" in runner.eager_reason


def test_an_op_replaced_in_python_runs_even_in_recorded_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fault injection and subclasses replace ops in Python; a program would skip them."""
    from xllm.backends.cpu.backend import CpuBackend

    backend = CpuBackend(kernels=True)
    if backend.kernels is None:
        pytest.skip("no C compiler here: the CPU backend runs its plain ops only")
    w = torch.randn(8, 8, generator=_gen(4))
    runner = backend.create_graph_runner(
        lambda x: backend.linear(x, w), {"x": GraphInput(torch.float32, (8,))}, capture_sizes=[1]
    )
    runner.run(x=torch.ones(1, 8))
    assert runner.is_recorded(1)
    calls = []
    real = backend._linear
    monkeypatch.setattr(backend, "_linear", lambda *a: calls.append(1) or real(*a))
    torch.testing.assert_close(runner.run(x=torch.ones(1, 8)), torch.ones(1, 8) @ w.T)
    assert calls == [1]


def test_recordings_stay_within_their_memory_and_other_steps_run_unpadded(
    cpu_kernels, monkeypatch: pytest.MonkeyPatch
) -> None:
    from xllm.backends.cpu import graphs

    w = torch.randn(256, 64, generator=_gen(8))
    seen: list[int] = []

    def fn(x: torch.Tensor) -> torch.Tensor:
        seen.append(x.shape[0])
        return cpu_kernels.linear(x, w)

    # Room for the 1-row bucket's output (1 KB) and not for the 8-row one's.
    monkeypatch.setattr(graphs, "GRAPH_MEMORY_BYTES", 4096)
    runner = cpu_kernels.create_graph_runner(
        fn, {"x": GraphInput(torch.float32, (64,))}, capture_sizes=[1, 8]
    )
    x = torch.randn(5, 64, generator=_gen(9))
    torch.testing.assert_close(runner.run(x=x[:1]), x[:1] @ w.T, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(runner.run(x=x), x @ w.T, rtol=1e-5, atol=1e-5)
    assert runner.is_recorded(1) and not runner.is_recorded(8) and runner.eager_reason is None
    assert seen == [1, 5]  # one recording run, then 5 rows as they are, not padded to 8
    with pytest.raises(ValueError, match="exceeds"):
        runner.run(x=torch.zeros(9, 64))
