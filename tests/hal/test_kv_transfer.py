"""KV transfer through the HAL (`Backend.create_kv_transfer`, `xllm.hal.tcp_kv_transfer`).

The main cases run across two OS processes, as prefill and decode instances do: a child process
(the "prefill" side) owns its own CPU KV cache and sends from it; this process (the "decode" side)
receives into its own. The rest exercises failure handling in one process over real sockets.
"""

from __future__ import annotations

import inspect
import json
import pickle
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

from xllm.hal import (
    KVLayoutMismatchError,
    KVTransferCancelled,
    KVTransferEngine,
    KVTransferError,
    KVTransferTimeout,
    get_backend,
)
from xllm.hal.tcp_kv_transfer import MAGIC, TcpKVTransferEngine

LAYERS, BLOCK, HEADS, DIM = 3, 4, 2, 8


def make_caches(num_blocks: int, dtype: str, seed: int, heads: int = 2) -> list[tuple[Any, Any]]:
    """A CPU KV cache of the test layout filled with seeded values (both processes build it)."""
    import torch

    from xllm.hal import get_backend

    caches = get_backend("cpu").allocate_kv_cache(3, num_blocks, 4, heads, 8, getattr(torch, dtype))
    gen = torch.Generator().manual_seed(seed)
    for k, v in caches:
        k.copy_(torch.randn(k.shape, generator=gen).to(k.dtype))
        v.copy_(torch.randn(v.shape, generator=gen).to(v.dtype))
    return caches


# The prefill side: JSON commands on stdin, one JSON reply per line on stdout.
CHILD = (
    "from __future__ import annotations\n"
    + inspect.getsource(make_caches)
    + """
import json, sys
import torch
from xllm.hal import get_backend, KVTransferError

engine = get_backend("cpu").create_kv_transfer(name="prefill")
caches = {}

def reply(obj):
    print(json.dumps(obj), flush=True)

def stats(s):
    return {"bytes": s.bytes, "blocks": s.blocks, "layers": s.layers, "tokens": s.tokens}

def err(exc):
    return {"error": type(exc).__name__, "message": str(exc)}

reply({"address": engine.address})
for line in sys.stdin:
    cmd = json.loads(line)
    if cmd["op"] == "cache":
        caches[cmd["name"]] = make_caches(cmd["blocks"], cmd["dtype"], cmd["seed"], cmd.get("heads", 2))
        reply({"ok": True})
    elif cmd["op"] == "send":
        futs = [
            engine.send_async(s["peer"], s["tid"], caches[s["cache"]], s["ids"], s["tokens"], s.get("layers"))
            for s in cmd["sends"]
        ]
        out = []
        for f in futs:
            try:
                out.append({"stats": stats(f.result())})
            except KVTransferError as exc:
                out.append(err(exc))
        reply(out)
    elif cmd["op"] == "exit":
        engine.close()
        reply({"ok": True})
        break
"""
)


class Prefill:
    """The child process and its command channel."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", CHILD], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.address = self._read()["address"]

    def _read(self) -> Any:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"prefill process died (rc {self.proc.poll()})")
        return json.loads(line)

    def call(self, **cmd: Any) -> Any:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._read()

    def close(self) -> None:
        try:
            self.call(op="exit")
        finally:
            self.proc.wait(timeout=10)


@pytest.fixture(scope="module")
def prefill() -> Iterator[Prefill]:
    p = Prefill()
    p.call(op="cache", name="f32", blocks=10, dtype="float32", seed=1)
    p.call(op="cache", name="bf16", blocks=10, dtype="bfloat16", seed=2)
    p.call(op="cache", name="wide", blocks=10, dtype="float32", seed=3, heads=4)
    yield p
    p.close()


@pytest.fixture
def decode() -> Iterator[KVTransferEngine]:
    engine = get_backend("cpu").create_kv_transfer(name="decode", arrival_wait_s=0.5)
    yield engine
    engine.close()


def kv_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("xllm-kv")]


def expected_after(dst: list, src: list, src_ids: list[int], dst_ids: list[int], tokens: int) -> list:
    out = [(k.clone(), v.clone()) for k, v in dst]
    for layer, pair in enumerate(out):
        for which, cache in enumerate(pair):
            for t in range(tokens):
                cache[dst_ids[t // BLOCK], t % BLOCK] = src[layer][which][src_ids[t // BLOCK], t % BLOCK]
    return out


def assert_caches_equal(actual: list, expected: list) -> None:
    for (ak, av), (ek, ev) in zip(actual, expected, strict=True):
        assert torch.equal(ak, ek) and torch.equal(av, ev)


# ---------------------------------------------------------------------------------- across processes


@pytest.mark.parametrize("dtype,name,seed", [("float32", "f32", 1), ("bfloat16", "bf16", 2)])
def test_blocks_arrive_bit_exact_from_another_process(prefill, decode, dtype, name, seed):
    src = make_caches(10, dtype, seed)  # the child's cache, rebuilt here to know what to expect
    dst = make_caches(12, dtype, seed + 100)
    before = [(k.clone(), v.clone()) for k, v in dst]
    src_ids, dst_ids, tokens = [7, 1, 2], [3, 11, 4], 2 * BLOCK + 3  # last block partial
    done = decode.expect("req-1", dst, dst_ids, tokens)
    [res] = prefill.call(
        op="send", sends=[dict(peer=decode.address, tid="req-1", cache=name, ids=src_ids, tokens=tokens)]
    )
    nbytes = 2 * LAYERS * tokens * HEADS * DIM * torch.empty((), dtype=getattr(torch, dtype)).element_size()
    assert res["stats"] == {"bytes": nbytes, "blocks": 3, "layers": LAYERS, "tokens": tokens}
    stats = done.result(timeout=5)
    assert (stats.bytes, stats.blocks, stats.tokens) == (nbytes, 3, tokens)
    assert "prefill" in stats.peer
    assert_caches_equal(dst, expected_after(before, src, src_ids, dst_ids, tokens))


def test_layer_by_layer_and_interleaved_transfers_from_another_process(prefill, decode):
    src = make_caches(10, "float32", 1)
    dst = make_caches(12, "float32", 7)
    before = [(k.clone(), v.clone()) for k, v in dst]
    a = dict(peer=decode.address, tid="A", cache="f32", ids=[0, 1, 2, 3], tokens=4 * BLOCK)
    b = dict(peer=decode.address, tid="B", cache="f32", ids=[9, 5], tokens=BLOCK + 1)
    done_a = decode.expect("A", dst, [8, 9, 10, 2], a["tokens"])
    done_b = decode.expect("B", dst, [0, 6], b["tokens"])
    sends = [dict(a, layers=[layer]) for layer in range(LAYERS)]
    sends.insert(1, b)  # all four calls in flight at once in the child
    results = prefill.call(op="send", sends=sends)
    assert all("stats" in r for r in results), results
    assert [r["stats"]["layers"] for r in results] == [1, LAYERS, 1, 1]
    done_a.result(timeout=5), done_b.result(timeout=5)
    expected = expected_after(before, src, a["ids"], [8, 9, 10, 2], a["tokens"])
    assert_caches_equal(dst, expected_after(expected, src, b["ids"], [0, 6], b["tokens"]))
    assert decode.wait("A", 0).layers == LAYERS  # finished transfers stay visible to wait()


def test_layout_mismatch_across_processes_names_the_difference(prefill, decode):
    dst = make_caches(12, "float32", 5)
    done = decode.expect("mm", dst, [1], 2)
    [res] = prefill.call(
        op="send", sends=[dict(peer=decode.address, tid="mm", cache="wide", ids=[1], tokens=2)]
    )
    assert res["error"] == "KVLayoutMismatchError"
    assert "num_kv_heads 4 (sender) != 2 (receiver)" in res["message"]
    assert prefill.address in res["message"] and decode.address in res["message"] and " tcp" in res["message"]
    with pytest.raises(KVLayoutMismatchError, match="num_kv_heads"):
        done.result(timeout=5)
    [res] = prefill.call(
        op="send", sends=[dict(peer=decode.address, tid="nobody", cache="f32", ids=[1], tokens=2)]
    )
    assert res["error"] == "KVTransferError" and "expects no transfer" in res["message"]


# ---------------------------------------------------------------------------------- in one process


def test_unreachable_peer_fails_fast_naming_both_ends():
    with socket.socket() as s:  # a port nobody listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    src = make_caches(4, "float32", 0)
    with get_backend("cpu").create_kv_transfer(name="p0") as engine:
        start = time.monotonic()
        with pytest.raises(KVTransferError) as info:
            engine.send(f"tcp://127.0.0.1:{port}", "r", src, [1], 3)
        assert time.monotonic() - start < 2
    msg = str(info.value)
    assert engine.address in msg and f"tcp://127.0.0.1:{port}" in msg and "over tcp" in msg
    assert "cannot connect" in msg
    again = pickle.loads(pickle.dumps(info.value))  # crosses process boundaries intact
    assert type(again) is KVTransferError and str(again) == msg and again.transport == "tcp"


def test_staged_path_is_exact_and_frees_its_buffers():
    src, dst = make_caches(6, "float16", 0), make_caches(6, "float16", 1)
    before = [(k.clone(), v.clone()) for k, v in dst]
    backend = get_backend("cpu")
    with (
        backend.create_kv_transfer(zero_copy=False) as tx,
        backend.create_kv_transfer(zero_copy=False) as rx,
    ):
        done = rx.expect("s", dst, [5, 0, 3], 9)
        tx.send(rx.address, "s", src, [2, 3, 4], 9)
        done.result(timeout=5)
        assert tx.state().staging_bytes == 0 and rx.state().staging_bytes == 0
    assert_caches_equal(dst, expected_after(before, src, [2, 3, 4], [5, 0, 3], 9))


def _half_sender(address: str, tid: str, tokens: int, close: bool) -> socket.socket:
    """A raw client that announces a transfer of all layers, then sends half a layer's K."""
    host, port = address.removeprefix("tcp://").rsplit(":", 1)
    s = socket.create_connection((host, int(port)), timeout=5)
    header = {
        "version": 1,
        "transfer_id": tid,
        "sender": "raw-client",
        "layout": {
            "num_layers": LAYERS,
            "block_size": BLOCK,
            "num_kv_heads": HEADS,
            "head_dim": DIM,
            "dtype": "float32",
        },
        "num_blocks": 2,
        "num_tokens": tokens,
        "layers": list(range(LAYERS)),
    }
    data = json.dumps(header).encode()
    s.sendall(MAGIC + struct.pack("!I", len(data)) + data)
    (n,) = struct.unpack("!I", s.recv(4))
    assert json.loads(s.recv(n))["ok"]
    s.sendall(b"\0" * (tokens * HEADS * DIM * 4 // 2))
    if close:
        s.close()
    return s


@pytest.mark.parametrize("zero_copy", [True, False])
def test_sender_disconnecting_mid_transfer_frees_everything(zero_copy):
    baseline = kv_threads()
    dst = make_caches(4, "float32", 0)
    rx = get_backend("cpu").create_kv_transfer(zero_copy=zero_copy)
    done = rx.expect("gone", dst, [1, 2], 6)
    _half_sender(rx.address, "gone", 6, close=True)
    with pytest.raises(KVTransferError, match="connection from the sender broke") as info:
        done.result(timeout=5)
    assert "raw-client" in str(info.value) and rx.address in str(info.value)
    st = rx.state()
    assert (st.pending_receives, st.open_connections, st.staging_bytes, st.failures) == (0, 0, 0, 1)
    rx.close()
    assert kv_threads() == baseline


def test_cancel_releases_receiver_and_refuses_late_data():
    baseline = kv_threads()
    dst = make_caches(4, "float32", 0)
    rx = get_backend("cpu").create_kv_transfer(zero_copy=False)
    done = rx.expect("c", dst, [1, 2], 6)
    stalled = _half_sender(rx.address, "c", 6, close=False)  # connected, mid-payload, silent
    deadline = time.monotonic() + 5
    while rx.state().staging_bytes == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert rx.state().staging_bytes > 0
    assert rx.cancel("c", "client disconnected")
    with pytest.raises(KVTransferCancelled, match="client disconnected"):
        done.result(timeout=5)
    deadline = time.monotonic() + 5
    while rx.state().open_connections and time.monotonic() < deadline:
        time.sleep(0.01)
    st = rx.state()
    assert (st.pending_receives, st.open_connections, st.staging_bytes) == (0, 0, 0)
    assert stalled.recv(1) == b""  # the receiver dropped the connection
    stalled.close()
    # The sender learns it was cancelled if it comes back with the same id.
    with (
        get_backend("cpu").create_kv_transfer() as tx,
        pytest.raises(KVTransferCancelled, match="cancelled by the receiver"),
    ):
        tx.send(rx.address, "c", make_caches(4, "float32", 1), [0, 1], 6)
    rx.close()
    assert kv_threads() == baseline


def test_sender_cancel_unblocks_a_send_to_a_stalled_receiver():
    # A peer that accepts the header, says ok, and never reads: the send blocks once the socket
    # buffers fill, until cancel() is called from another thread.
    listener = socket.create_server(("127.0.0.1", 0))
    conns: list[socket.socket] = []

    def stall() -> None:
        c, _ = listener.accept()
        conns.append(c)
        c.recv(65536)
        data = json.dumps({"ok": True}).encode()
        c.sendall(struct.pack("!I", len(data)) + data)

    threading.Thread(target=stall, daemon=True).start()
    big = get_backend("cpu").allocate_kv_cache(2, 256, 16, 8, 128, torch.float32)  # 64 MiB to send
    tx = get_backend("cpu").create_kv_transfer()
    result: list[BaseException] = []

    def run() -> None:
        try:
            tx.send(f"tcp://127.0.0.1:{listener.getsockname()[1]}", "big", big, list(range(256)), 256 * 16)
        except BaseException as exc:  # noqa: BLE001 - inspected below
            result.append(exc)

    t = threading.Thread(target=run)
    t.start()
    deadline = time.monotonic() + 5
    while not tx.state().active_sends and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    assert tx.cancel("big")
    t.join(timeout=5)
    assert not t.is_alive() and isinstance(result[0], KVTransferCancelled)
    assert tx.state().active_sends == 0
    tx.close()
    for c in conns:
        c.close()
    listener.close()


def test_expected_transfer_that_never_comes_times_out_and_is_released():
    dst = make_caches(4, "float32", 0)
    with get_backend("cpu").create_kv_transfer() as rx:
        done = rx.expect("late", dst, [1], 2, timeout_s=0.3)
        with pytest.raises(KVTransferTimeout, match="not complete within its timeout"):
            done.result(timeout=5)
        assert rx.state().pending_receives == 0
        with pytest.raises(KVTransferTimeout):
            rx.wait("late", 1)  # finished futures keep their outcome


def test_bad_arguments_are_value_errors():
    src = make_caches(4, "float32", 0)
    with get_backend("cpu").create_kv_transfer() as engine:
        with pytest.raises(ValueError, match="num_tokens"):
            engine.expect("x", src, [1, 2], 3)  # 2 blocks of 4 hold 5..8 tokens
        with pytest.raises(ValueError, match="outside"):
            engine.expect("x", src, [4], 1)
        with pytest.raises(ValueError, match="repeats"):
            engine.send(engine.address, "x", src, [1, 1], 6)
        with pytest.raises(ValueError, match="layers"):
            engine.send(engine.address, "x", src, [1], 2, layers=[3])
        with pytest.raises(ValueError, match="tcp://host:port"):
            engine.send("http://x:1", "x", src, [1], 2)
        engine.expect("dup", src, [1], 2)
        with pytest.raises(ValueError, match="already expected"):
            engine.expect("dup", src, [1], 2)


def test_engine_is_a_tcp_engine_on_cpu():
    with get_backend("cpu").create_kv_transfer(name="x") as engine:
        assert isinstance(engine, TcpKVTransferEngine)
        assert engine.address.startswith("tcp://127.0.0.1:")
