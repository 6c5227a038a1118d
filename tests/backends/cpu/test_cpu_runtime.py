"""CPU graph runner (eager replay with bucket padding), synchronous streams/events, gloo comm."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest
import torch

from xllm.hal import GraphInput


def test_graph_runner_pads_and_returns_only_the_batch_rows(cpu):
    seen_batches: list[list[int]] = []

    def step(ids: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        seen_batches.append(ids.tolist())
        return ids.to(torch.float32).unsqueeze(1) * scale

    runner = cpu.create_graph_runner(
        step,
        {
            "ids": GraphInput(torch.int64, (), pad_value=-1),
            "scale": GraphInput(torch.float32, (3,), pad_value=0.0),
        },
        capture_sizes=[1, 2, 4, 8],
    )
    runner.capture()
    assert runner.is_captured
    scale = torch.tensor([[1.0, 2.0, 3.0]] * 3)
    out = runner.run(ids=torch.tensor([5, 6, 7]), scale=scale)
    assert out.shape == (3, 3)
    assert out.tolist() == [[5.0, 10.0, 15.0], [6.0, 12.0, 18.0], [7.0, 14.0, 21.0]]
    assert seen_batches[-1] == [5, 6, 7, -1]  # replayed bucket 4, padded with pad_value
    first = out
    out2 = runner.run(ids=torch.tensor([1]), scale=scale[:1])
    assert out2.tolist() == [[1.0, 2.0, 3.0]]
    assert first.data_ptr() == out2.data_ptr()  # a static output buffer, reused
    with pytest.raises(ValueError, match="exceeds"):
        runner.run(ids=torch.zeros(9, dtype=torch.int64), scale=torch.zeros(9, 3))


def test_buckets_captured_on_first_use_in_any_order(cpu):
    runner = cpu.create_graph_runner(
        lambda x: x * 2, {"x": GraphInput(torch.float32, (2,))}, capture_sizes=[2, 8]
    )
    assert runner.run(x=torch.ones(1, 2)).tolist() == [[2.0, 2.0]]  # bucket 2 first, then a larger one
    assert runner.run(x=torch.full((5, 2), 3.0)).tolist() == [[6.0, 6.0]] * 5
    assert runner.run(x=torch.full((2, 2), 4.0)).tolist() == [[8.0, 8.0]] * 2


def test_streams_and_events_are_synchronous(cpu):
    default = cpu.current_stream()
    s = cpu.create_stream()
    with s:
        assert cpu.current_stream() is s
    assert cpu.current_stream() is default
    start, end = cpu.create_event(enable_timing=True), cpu.create_event(enable_timing=True)
    start.record()
    time.sleep(0.02)
    end.record(s)
    s.wait_event(end)
    s.synchronize()
    cpu.synchronize()
    assert end.query()
    assert 15.0 <= start.elapsed_time_ms(end) < 2000.0
    untimed = cpu.create_event()
    untimed.record()
    with pytest.raises(RuntimeError):
        untimed.elapsed_time_ms(end)


WORKER = textwrap.dedent(
    """
    import sys, torch
    from xllm.backends.cpu.backend import CpuBackend
    rank, port = int(sys.argv[1]), int(sys.argv[2])
    comm = CpuBackend().create_communicator(rank, 2, f"tcp://127.0.0.1:{port}")
    t = torch.tensor([1.0, 2.0]) * (rank + 1)
    assert comm.all_reduce(t).tolist() == [3.0, 6.0], t
    g = comm.all_gather(torch.full((2, 2), float(rank)))
    assert g.shape == (4, 2) and g[:2].eq(0).all() and g[2:].eq(1).all(), g
    if rank == 0:
        comm.send(torch.arange(4, dtype=torch.int64), dst=1)
    else:
        got = comm.recv(torch.zeros(4, dtype=torch.int64), src=0)
        assert got.tolist() == [0, 1, 2, 3], got
    comm.barrier()
    comm.close()
    print("rank", rank, "ok")
    """
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_gloo_communicator_two_processes(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    port = free_port()
    env = dict(os.environ, GLOO_SOCKET_IFNAME=os.environ.get("GLOO_SOCKET_IFNAME", "lo"), OMP_NUM_THREADS="1")
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    procs = [
        subprocess.Popen(
            [sys.executable, str(script), str(r), str(port)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=120)[0])
        except subprocess.TimeoutExpired:
            for q in procs:
                q.kill()
            raise
    for r, (p, text) in enumerate(zip(procs, outputs, strict=False)):
        assert p.returncode == 0, f"rank {r} failed:\n{text}"
        assert f"rank {r} ok" in text


def test_create_communicator_checks_rank(cpu):
    with pytest.raises(ValueError, match="'rank'"):
        cpu.create_communicator(2, 2, "tcp://127.0.0.1:1")
