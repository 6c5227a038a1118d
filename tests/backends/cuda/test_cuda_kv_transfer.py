"""CUDA's KV transfer: NCCL for the payload, the TCP engine for everything else.

Without a GPU the pure parts run as they are (row indices, chunking, gather/scatter, the
negotiation) and the whole protocol runs between two engines in this process with `FakeNcclOps`,
a host stand-in for the NCCL calls that pairs the two ranks through queues. The `gpu` tests run
two real processes: on one GPU the ends must fall back to staged TCP (NCCL refuses two ranks on
one device); with two GPUs the KV moves over NCCL. Run them on their own:

    pytest -m gpu tests/backends/cuda/test_cuda_kv_transfer.py
"""

from __future__ import annotations

import contextlib
import json
import queue
import secrets
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from xllm.backends.cuda.kv_transfer import (
    NcclEndpoint,
    NcclOps,
    NcclTransport,
    _peer_gone,
    create_cuda_kv_transfer,
    gather_layers,
    negotiate,
    plan_chunks,
    scatter_layers,
    token_rows,
)
from xllm.hal import KVTransferError
from xllm.hal.kv_transfer import TransferStats
from xllm.hal.tcp_kv_transfer import MAGIC, DeviceTransferStats, TcpKVTransferEngine, _token_views

LAYERS, BLOCK, HEADS, DIM = 3, 4, 2, 8


def make_caches(num_blocks: int, seed: int, dtype: torch.dtype = torch.float32) -> list[tuple[Any, Any]]:
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, BLOCK, HEADS, DIM)
    return [
        (torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
        for _ in range(LAYERS)
    ]


def rows_of(caches: list[tuple[Any, Any]], ids: list[int], num_tokens: int) -> list[torch.Tensor]:
    return [torch.cat(list(_token_views(c, ids, num_tokens))) for pair in caches for c in pair]


# ---------------------------------------------------------------------------------- pure logic


def test_token_rows_cover_blocks_in_order_and_stop_at_num_tokens() -> None:
    assert token_rows([5, 2, 7], 4, 10).tolist() == [20, 21, 22, 23, 8, 9, 10, 11, 28, 29]
    assert token_rows([0], 4, 4).tolist() == [0, 1, 2, 3]
    assert token_rows([3, 4], 16, 17).tolist() == list(range(48, 65))


def test_plan_chunks_groups_layers_within_the_byte_budget() -> None:
    assert plan_chunks([0, 1, 2, 3, 4], 100, 250) == [[0, 1], [2, 3], [4]]
    assert plan_chunks([2, 5], 100, 50) == [[2], [5]]  # a layer over the budget goes alone
    assert plan_chunks([0, 1, 2], 100, 10_000) == [[0, 1, 2]]


def test_gather_then_scatter_moves_exactly_the_token_rows() -> None:
    src, dst = make_caches(8, seed=1), make_caches(8, seed=2)
    before = [(k.clone(), v.clone()) for k, v in dst]
    src_ids, dst_ids, num_tokens, layers = [6, 1, 3], [0, 7, 2], 9, [0, 2]
    buf = torch.empty(len(layers), 2, num_tokens, HEADS, DIM)
    gather_layers(src, layers, token_rows(src_ids, BLOCK, num_tokens), buf)
    # The buffer holds what TCP would have sent, in its order (per layer K then V).
    expect = rows_of([src[i] for i in layers], src_ids, num_tokens)
    assert all(torch.equal(buf[i, j], expect[2 * i + j]) for i in range(2) for j in range(2))
    scatter_layers(dst, layers, token_rows(dst_ids, BLOCK, num_tokens), buf)
    for layer in range(LAYERS):
        for j in range(2):
            got, old = dst[layer][j], before[layer][j]
            if layer in layers:
                assert torch.equal(
                    torch.cat(list(_token_views(got, dst_ids, num_tokens))),
                    expect[2 * layers.index(layer) + j],
                )
                assert torch.equal(got[2, 1:], old[2, 1:])  # partial last block: rest untouched
            else:
                assert torch.equal(got, old)
            untouched = [b for b in range(8) if b not in dst_ids]
            assert torch.equal(got[untouched], old[untouched])


OFFER = {"kind": "nccl", "version": 1, "nccl": "2.21.5", "gpu": "GPU-a"}


@pytest.mark.parametrize(
    ("offer", "local", "why"),
    [
        (None, NcclEndpoint("2.21.5", "GPU-b"), "offers no NCCL"),
        (OFFER, None, "receiver cannot use NCCL"),
        ({**OFFER, "version": 99}, NcclEndpoint("2.21.5", "GPU-b"), "protocol 99"),
        (OFFER, NcclEndpoint("2.18.1", "GPU-b"), "NCCL 2.21.5 (sender) != 2.18.1"),
        (OFFER, NcclEndpoint("2.21.5", "GPU-a"), "same GPU"),
        (OFFER, NcclEndpoint("2.21.5", "GPU-b"), None),
    ],
)
def test_negotiation_falls_back_to_tcp_unless_both_ends_can_use_nccl(
    offer: dict[str, Any] | None, local: NcclEndpoint | None, why: str | None
) -> None:
    got = negotiate(offer, local)
    assert got is None if why is None else why in (got or "")


def test_real_ops_offer_nothing_for_host_caches() -> None:
    # Interpret mode and CPU caches: no "device" field, so the TCP wire format is unchanged.
    assert NcclTransport().offer(make_caches(4, seed=0), "tcp://127.0.0.1:1") is None


def test_header_of_a_host_transfer_has_no_device_field() -> None:
    # An engine carrying the NCCL transport but sending host caches speaks plain TCP on the wire.
    listener = socket.create_server(("127.0.0.1", 0))
    peer = f"tcp://127.0.0.1:{listener.getsockname()[1]}"
    seen: dict[str, Any] = {}

    def receive() -> None:
        conn, _ = listener.accept()
        with conn:
            assert conn.recv(4, socket.MSG_WAITALL) == MAGIC
            (n,) = struct.unpack("!I", conn.recv(4, socket.MSG_WAITALL))
            seen.update(json.loads(conn.recv(n, socket.MSG_WAITALL)))

    t = threading.Thread(target=receive)
    t.start()
    with TcpKVTransferEngine(device_transport=NcclTransport(), send_timeout_s=5).start() as engine:
        with pytest.raises(KVTransferError):
            engine.send(peer, "x", make_caches(4, seed=0), [0], 2)  # the fake receiver hangs up
    t.join(5)
    listener.close()
    assert seen["transfer_id"] == "x" and "device" not in seen


def test_peer_gone_sees_a_closed_or_shut_down_connection() -> None:
    a, b = socket.socketpair()
    with a, b:
        assert not _peer_gone(a)
        b.sendall(b"{")  # a frame on its way is not a closed connection
        assert not _peer_gone(a)
        assert a.recv(1) == b"{"
        b.close()
        assert _peer_gone(a)
    c, d = socket.socketpair()
    with c, d:
        c.shutdown(socket.SHUT_RDWR)  # what the engine's `cancel` does to the connection
        assert _peer_gone(c)


def test_without_a_gpu_the_cuda_engine_is_plain_tcp() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is visible")
    with create_cuda_kv_transfer("127.0.0.1", 0) as engine:
        assert engine.state().transport == "tcp"


# ---------------------------------------------------------------------------------- protocol on the host


class _Hub:
    """Where the two fake ranks of each communicator meet."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.barriers: dict[bytes, threading.Barrier] = {}
        self.queues: dict[bytes, queue.Queue[torch.Tensor]] = {}
        self.inits = 0
        self.timeout_s = 10.0  # how long a fake rank 1 waits for rank 0 (a stuck kernel)


class FakeNcclOps(NcclOps):
    """NCCL stand-in on host tensors: `init_rank` waits for both ranks of a uid, `broadcast` hands
    rank 0's bytes to rank 1 in order (as NCCL matches a communicator's operations by order)."""

    def __init__(self, hub: _Hub, gpu: str, fail_broadcasts: int = 0) -> None:
        self.hub, self.gpu, self.fail_broadcasts = hub, gpu, fail_broadcasts

    def usable(self, t: torch.Tensor) -> bool:
        return t.device.type == "cpu"

    def endpoint(self, device: torch.device) -> NcclEndpoint | None:
        return NcclEndpoint("fake-1", self.gpu)

    def unique_id(self) -> bytes:
        return secrets.token_bytes(128)

    def init_rank(self, uid: bytes, rank: int, device: torch.device) -> Any:
        with self.hub.lock:
            barrier = self.hub.barriers.setdefault(uid, threading.Barrier(2))
            self.hub.queues.setdefault(uid, queue.Queue())
            self.hub.inits += 1
        barrier.wait(timeout=10)
        return (uid, rank)

    def new_stream(self, device: torch.device) -> Any:
        return None

    @contextlib.contextmanager
    def on_stream(self, stream: Any, device: torch.device) -> Iterator[None]:
        yield

    def broadcast(self, buf: torch.Tensor, comm: Any, stream: Any) -> None:
        if self.fail_broadcasts:
            self.fail_broadcasts -= 1
            raise RuntimeError("NCCL error: unhandled system error (injected)")
        uid, rank = comm
        if rank == 0:
            self.hub.queues[uid].put(buf.clone())
        else:
            buf.copy_(self.hub.queues[uid].get(timeout=self.hub.timeout_s))

    def wait(self, stream: Any, deadline: float, abort: Any = None) -> bool:
        return True


def _engine(ops: NcclOps | None, **nccl: Any) -> TcpKVTransferEngine:
    transport = None if ops is None else NcclTransport(ops=ops, init_timeout_s=5, **nccl)
    return TcpKVTransferEngine(device_transport=transport, send_timeout_s=10, arrival_wait_s=2).start()


@pytest.fixture
def hub() -> _Hub:
    return _Hub()


def _transfer(
    sender: TcpKVTransferEngine,
    receiver: TcpKVTransferEngine,
    tid: str,
    src: list[tuple[Any, Any]],
    dst: list[tuple[Any, Any]],
    src_ids: list[int],
    dst_ids: list[int],
    num_tokens: int,
    layer_calls: list[list[int] | None] | None = None,
) -> tuple[list[TransferStats], TransferStats]:
    fut = receiver.expect(tid, dst, dst_ids, num_tokens)
    sent = [
        sender.send(receiver.address, tid, src, src_ids, num_tokens, layers=ls)
        for ls in layer_calls or [None]
    ]
    return sent, fut.result(timeout=10)


def test_nccl_path_moves_blocks_bit_exactly_and_says_so(hub: _Hub) -> None:
    with _engine(FakeNcclOps(hub, "GPU-a"), max_chunk_bytes=1) as a, _engine(FakeNcclOps(hub, "GPU-b")) as b:
        src, dst = make_caches(8, seed=3, dtype=torch.bfloat16), make_caches(8, seed=4, dtype=torch.bfloat16)
        before = [(k.clone(), v.clone()) for k, v in dst]
        (sent,), got = _transfer(a, b, "r1", src, dst, [4, 5, 1], [2, 0, 6], 10)
        assert isinstance(sent, DeviceTransferStats) and sent.transport == "nccl"
        assert isinstance(got, DeviceTransferStats) and got.transport == "nccl"
        nbytes = 2 * LAYERS * 10 * HEADS * DIM * 2
        assert sent.bytes == got.bytes == nbytes and got.blocks == 3 and got.tokens == 10
        for x, y in zip(rows_of(src, [4, 5, 1], 10), rows_of(dst, [2, 0, 6], 10), strict=True):
            assert torch.equal(x, y)
        for (k, v), (k0, v0) in zip(dst, before, strict=True):
            assert torch.equal(k[6, 2:], k0[6, 2:]) and torch.equal(v[6, 2:], v0[6, 2:])
        assert a.state().transport == "tcp+nccl" and a.state().bytes_sent == nbytes
        assert b.state().bytes_received == nbytes and b.state().open_connections == 0


def test_communicator_is_cached_per_peer_and_reused(hub: _Hub) -> None:
    with _engine(FakeNcclOps(hub, "GPU-a")) as a, _engine(FakeNcclOps(hub, "GPU-b")) as b:
        src = make_caches(8, seed=5)
        for i in range(3):
            dst = make_caches(8, seed=6)
            _transfer(a, b, f"r{i}", src, dst, [0, 1], [3, 4], 7)
            for x, y in zip(rows_of(src, [0, 1], 7), rows_of(dst, [3, 4], 7), strict=True):
                assert torch.equal(x, y)
        assert hub.inits == 2  # one communicator, both ranks, set up once
        assert a._device.communicators() == {"send": 1, "receive": 0}  # type: ignore[union-attr]
        assert b._device.communicators() == {"send": 0, "receive": 1}  # type: ignore[union-attr]
        # The other direction is another communicator (the sender is always rank 0).
        dst = make_caches(8, seed=7)
        _transfer(b, a, "back", src, dst, [2], [5], 3)
        assert hub.inits == 4


def test_layer_by_layer_and_concurrent_transfers_over_one_communicator(hub: _Hub) -> None:
    with _engine(FakeNcclOps(hub, "GPU-a")) as a, _engine(FakeNcclOps(hub, "GPU-b")) as b:
        src = make_caches(8, seed=8)
        dst1, dst2 = make_caches(8, seed=9), make_caches(8, seed=10)
        sent, got = _transfer(a, b, "lbl", src, dst1, [1, 2], [6, 7], 5, layer_calls=[[2], [0], [1]])
        assert got.layers == LAYERS and all(s.layers == 1 and s.transport == "nccl" for s in sent)  # type: ignore[attr-defined]
        f1 = b.expect("c1", dst2, [0, 1], 8)
        f2 = b.expect("c2", dst1, [3], 2)
        s1 = a.send_async(b.address, "c1", src, [4, 5], 8)
        s2 = a.send_async(b.address, "c2", src, [0], 2)
        assert s1.result(10).bytes == f1.result(10).bytes and s2.result(10).bytes == f2.result(10).bytes
        for x, y in zip(rows_of(src, [4, 5], 8), rows_of(dst2, [0, 1], 8), strict=True):
            assert torch.equal(x, y)
        for x, y in zip(rows_of(src, [0], 2), rows_of(dst1, [3], 2), strict=True):
            assert torch.equal(x, y)


def test_concurrent_first_sends_to_a_new_peer_each_set_up_and_all_arrive(hub: _Hub) -> None:
    with _engine(FakeNcclOps(hub, "GPU-a")) as a, _engine(FakeNcclOps(hub, "GPU-b")) as b:
        src, dst = make_caches(8, seed=20), make_caches(8, seed=21)
        fut = b.expect("par", dst, [5, 6], 6)
        sends = [a.send_async(b.address, "par", src, [2, 3], 6, layers=[i]) for i in range(LAYERS)]
        assert all(s.result(10).transport == "nccl" for s in sends)  # type: ignore[attr-defined]
        assert fut.result(10).layers == LAYERS
        for x, y in zip(rows_of(src, [2, 3], 6), rows_of(dst, [5, 6], 6), strict=True):
            assert torch.equal(x, y)
        # Later sends use the newest pair; the others stay usable for whoever named them.
        _transfer(a, b, "after", src, make_caches(8, seed=22), [0], [0], 4)
        assert 1 <= a._device.communicators()["send"] <= LAYERS  # type: ignore[union-attr]


@pytest.mark.parametrize("case", ["receiver without nccl", "sender without nccl", "same gpu"])
def test_falls_back_to_tcp_when_a_side_lacks_nccl(hub: _Hub, case: str) -> None:
    ops_a = None if case == "sender without nccl" else FakeNcclOps(hub, "GPU-a")
    ops_b = (
        None
        if case == "receiver without nccl"
        else FakeNcclOps(hub, "GPU-a" if case == "same gpu" else "GPU-b")
    )
    with _engine(ops_a) as a, _engine(ops_b) as b:
        src, dst = make_caches(8, seed=11), make_caches(8, seed=12)
        (sent,), got = _transfer(a, b, "t", src, dst, [3, 1], [0, 2], 6)
        assert type(sent) is TransferStats and type(got) is TransferStats  # plain TCP, as before
        for x, y in zip(rows_of(src, [3, 1], 6), rows_of(dst, [0, 2], 6), strict=True):
            assert torch.equal(x, y)
        assert hub.inits == 0


def test_nccl_failure_names_the_transport_and_the_next_transfer_rebuilds(hub: _Hub) -> None:
    with _engine(FakeNcclOps(hub, "GPU-a", fail_broadcasts=1)) as a, _engine(FakeNcclOps(hub, "GPU-b")) as b:
        src, dst = make_caches(8, seed=13), make_caches(8, seed=14)
        hub.timeout_s = 1.0  # the receiver's half of the failed broadcast gives up sooner
        fut = b.expect("bad", dst, [0], 4)
        with pytest.raises(KVTransferError) as info:
            a.send(b.address, "bad", src, [1], 4)
        assert info.value.transport == "nccl" and "NCCL send failed" in str(info.value)
        assert a.address in str(info.value) or b.address in str(info.value)
        with pytest.raises(KVTransferError) as recv:
            fut.result(timeout=10)
        assert recv.value.transport == "nccl"
        assert a._device.communicators()["send"] == 0  # type: ignore[union-attr]
        # The receiver kept its (now orphaned) end; the sender builds a new pair on the next one.
        _transfer(a, b, "good", src, dst, [1], [0], 4)
        assert torch.equal(dst[0][0][0], src[0][0][1])
        assert hub.inits == 4


class _BrokenInitOps(FakeNcclOps):
    def init_rank(self, uid: bytes, rank: int, device: torch.device) -> Any:
        raise RuntimeError("NCCL error: invalid usage (injected)")


def test_set_up_failing_on_one_side_fails_both_without_waiting_out_the_timeout(hub: _Hub) -> None:
    with _engine(FakeNcclOps(hub, "GPU-a")) as a, _engine(_BrokenInitOps(hub, "GPU-b")) as b:
        a._device.init_timeout_s = 30  # type: ignore[union-attr]
        fut = b.expect("s", make_caches(8, seed=18), [0], 4)
        start = time.monotonic()
        with pytest.raises(KVTransferError) as info:
            a.send(b.address, "s", make_caches(8, seed=19), [1], 4)
        assert time.monotonic() - start < 5 and info.value.transport == "nccl"
        with pytest.raises(KVTransferError, match="set-up failed"):
            fut.result(timeout=5)
        assert a._device.communicators()["send"] == 0  # type: ignore[union-attr]


def test_receiver_that_lost_the_communicator_asks_for_a_new_one(hub: _Hub) -> None:
    with _engine(FakeNcclOps(hub, "GPU-a")) as a, _engine(FakeNcclOps(hub, "GPU-b")) as b:
        src = make_caches(8, seed=15)
        _transfer(a, b, "one", src, make_caches(8, seed=16), [0], [0], 4)
        b._device.close()  # type: ignore[union-attr]  # as a restarted decode instance would be
        b._device._closed = False  # type: ignore[union-attr]
        dst = make_caches(8, seed=17)
        (sent,), got = _transfer(a, b, "two", src, dst, [2], [1], 3)
        assert got.transport == "nccl" and hub.inits == 4  # type: ignore[attr-defined]
        assert torch.equal(dst[1][1][1, :3], src[1][1][2, :3])


# ---------------------------------------------------------------------------------- real GPUs, two processes

SENDER = """
import json, sys
import torch
from xllm.backends.cuda.kv_transfer import create_cuda_kv_transfer
cmd = json.loads(sys.argv[1])
gen = torch.Generator().manual_seed(cmd["seed"])
shape = (cmd["blocks"], cmd["block"], cmd["heads"], cmd["dim"])
dtype = getattr(torch, cmd["dtype"])
dev = torch.device(cmd["device"])
caches = [(torch.randn(shape, generator=gen).to(dtype).to(dev), torch.randn(shape, generator=gen).to(dtype).to(dev))
          for _ in range(cmd["layers"])]
torch.cuda.synchronize(dev)
engine = create_cuda_kv_transfer("127.0.0.1", 0, name="prefill")
out = []
for tid in cmd["tids"]:
    s = engine.send(cmd["peer"], tid, caches, cmd["ids"], cmd["tokens"])
    out.append({"transport": getattr(s, "transport", "tcp"), "bytes": s.bytes})
engine.close()
print(json.dumps(out), flush=True)
"""


def _gpu_roundtrip(sender_device: str, receiver_device: str) -> list[dict[str, Any]]:
    layers, blocks, block, heads, dim, dtype = 4, 16, 16, 8, 128, "bfloat16"
    src_ids, dst_ids, tokens = [3, 9, 4], [11, 0, 7], 37  # partial last block
    gen = torch.Generator().manual_seed(21)
    shape = (blocks, block, heads, dim)
    src = [
        (
            torch.randn(shape, generator=gen).to(torch.bfloat16),
            torch.randn(shape, generator=gen).to(torch.bfloat16),
        )
        for _ in range(layers)
    ]
    dev = torch.device(receiver_device)
    receiver = create_cuda_kv_transfer("127.0.0.1", 0, name="decode")
    try:
        tids = ["g1", "g2"]  # the second reuses the cached communicator
        dsts = [
            [
                (
                    torch.zeros(shape, dtype=torch.bfloat16, device=dev),
                    torch.zeros(shape, dtype=torch.bfloat16, device=dev),
                )
                for _ in range(layers)
            ]
            for _ in tids
        ]
        futs = [
            receiver.expect(t, d, dst_ids, tokens, timeout_s=120) for t, d in zip(tids, dsts, strict=True)
        ]
        cmd = {
            "seed": 21, "blocks": blocks, "block": block, "heads": heads, "dim": dim, "dtype": dtype,
            "layers": layers, "device": sender_device, "peer": receiver.address, "tids": tids,
            "ids": src_ids, "tokens": tokens,
        }  # fmt: skip
        proc = subprocess.run(
            [sys.executable, "-c", SENDER, json.dumps(cmd)], capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        results = json.loads(proc.stdout.strip().splitlines()[-1])
        for fut, dst in zip(futs, dsts, strict=True):
            got = fut.result(timeout=60)
            assert getattr(got, "transport", "tcp") == results[0]["transport"]
            host = [(k.cpu(), v.cpu()) for k, v in dst]
            for x, y in zip(rows_of(src, src_ids, tokens), rows_of(host, dst_ids, tokens), strict=True):
                assert torch.equal(x.view(torch.int16), y.view(torch.int16))  # bit-exact
            for k, v in host:  # rows past the tokens and unlisted blocks stay zero
                assert not k[7, tokens - 32 :].any() and not v[7, tokens - 32 :].any()
                assert not k[1].any() and not v[1].any()
        device = receiver._device  # type: ignore[attr-defined]
        for r in results:
            r["receive_comms"] = device.communicators()["receive"] if device is not None else 0
        return results
    finally:
        receiver.close()


@pytest.mark.gpu
def test_gpu_two_processes_on_one_gpu_fall_back_to_staged_tcp() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    results = _gpu_roundtrip("cuda:0", "cuda:0")
    assert [r["transport"] for r in results] == ["tcp", "tcp"]  # NCCL refuses one GPU twice


@pytest.mark.gpu
def test_gpu_two_processes_on_two_gpus_move_kv_over_nccl() -> None:
    if not torch.cuda.is_available() or torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices (NCCL refuses two ranks on one GPU)")
    results = _gpu_roundtrip("cuda:0", "cuda:1")
    assert [r["transport"] for r in results] == ["nccl", "nccl"]
    assert results[0]["bytes"] == 2 * 4 * 37 * 8 * 128 * 2
    assert results[0]["receive_comms"] == 1  # the second transfer reused the pair communicator


@pytest.mark.gpu
def test_gpu_gather_scatter_on_the_device_is_bit_exact() -> None:
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    dev = torch.device("cuda:0")
    src = [(k.to(dev), v.to(dev)) for k, v in make_caches(8, seed=30, dtype=torch.bfloat16)]
    dst = [(k.to(dev), v.to(dev)) for k, v in make_caches(8, seed=31, dtype=torch.bfloat16)]
    before = [(k.cpu(), v.cpu()) for k, v in dst]
    ops, stream = NcclOps(), torch.cuda.Stream(device=dev)
    buf = torch.empty(LAYERS, 2, 10, HEADS, DIM, dtype=torch.bfloat16, device=dev)
    with ops.on_stream(stream, dev):
        gather_layers(src, range(LAYERS), token_rows([6, 1, 3], BLOCK, 10).to(dev), buf)
        scatter_layers(dst, range(LAYERS), token_rows([0, 7, 2], BLOCK, 10).to(dev), buf)
    assert ops.wait(stream, time.monotonic() + 30)
    host_src = [(k.cpu(), v.cpu()) for k, v in src]
    host_dst = [(k.cpu(), v.cpu()) for k, v in dst]
    for x, y in zip(rows_of(host_src, [6, 1, 3], 10), rows_of(host_dst, [0, 7, 2], 10), strict=True):
        assert torch.equal(x.view(torch.int16), y.view(torch.int16))
    for (k, v), (k0, v0) in zip(host_dst, before, strict=True):
        assert torch.equal(k[2, 2:], k0[2, 2:]) and torch.equal(v[[1, 3, 4, 5, 6]], v0[[1, 3, 4, 5, 6]])
