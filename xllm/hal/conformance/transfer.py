"""Case kind ``kv_transfer``: the backend's `create_kv_transfer` moves KV blocks bit-exactly.

Two engines of the backend under test, one sending and one receiving, in this process but over a
real loopback connection (whatever their transport), between two KV caches the backend allocated
(different sizes, different block ids on each side). Every case compares the whole destination
cache with what it must hold: the sent token rows in the destination blocks, every other row and
block untouched. Labels:

* ``full``: all layers in one call, whole blocks;
* ``partial``: the last block holds fewer tokens than a block (its rows past them stay as they were);
* ``layerwise``: one call per layer into one cache and one batched call into another: both exact;
* ``interleaved``: two transfers in flight at once (different ids and blocks, one of them layer by
  layer), both exact;
* ``mismatch``: the receiver's caches have other head counts: the sender gets a
  `KVLayoutMismatchError`, the receiver's transfer fails with one, and both name the two
  endpoints and the transport.

A backend whose `create_kv_transfer` raises `NotSupportedError` reports the cases as not
supported. The kind checks the backend against itself, so it needs no reference.
"""

from __future__ import annotations

import concurrent.futures
from typing import Any

import torch

from xllm.hal.conformance.cases import DTYPES, Case, make_case, register_kind
from xllm.hal.conformance.compare import Checker
from xllm.hal.conformance.inputs import generator, randn
from xllm.hal.kv_transfer import KVLayoutMismatchError, KVTransferEngine, KVTransferError

_TIMEOUT_S = 30.0
_LABELS = ("full", "partial", "layerwise", "interleaved", "mismatch")
_SMALL = ("partial", "interleaved", "mismatch")


def _build() -> list[Case]:
    return [
        make_case("kv_transfer", dtype, small=label in _SMALL, label=label, L=3, bs=16, hkv=2, d=64)
        for dtype in DTYPES
        for label in _LABELS
    ]


def _caches(
    backend: Any, gen: torch.Generator, p: dict[str, Any], num_blocks: int, dtype: torch.dtype, hkv: int
):
    """Backend-allocated caches filled with random values (so untouched rows are checkable)."""
    caches = backend.allocate_kv_cache(p["L"], num_blocks, p["bs"], hkv, p["d"], dtype)
    for k, v in caches:
        k.copy_(randn(gen, tuple(k.shape), dtype).to(k.device))
        v.copy_(randn(gen, tuple(v.shape), dtype).to(v.device))
    backend.synchronize()
    return caches


def _host(caches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(k.detach().to("cpu", copy=True), v.detach().to("cpu", copy=True)) for k, v in caches]


def _expected(
    src: list[tuple[torch.Tensor, torch.Tensor]],
    dst_before: list[tuple[torch.Tensor, torch.Tensor]],
    src_ids: list[int],
    dst_ids: list[int],
    num_tokens: int,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Host copy of the destination after the transfer, token row by token row."""
    out = [(k.clone(), v.clone()) for k, v in dst_before]
    bs = src[0][0].shape[1]
    for layer, pair in enumerate(out):
        for which, cache in enumerate(pair):
            for t in range(num_tokens):
                cache[dst_ids[t // bs], t % bs] = src[layer][which][src_ids[t // bs], t % bs]
    return out


def _compare(chk: Checker, what: str, actual: list, expected: list) -> None:
    for layer, ((ak, av), (ek, ev)) in enumerate(zip(_host(actual), expected, strict=True)):
        chk.exact(f"{what}: layer {layer} k cache", ak, ek)
        chk.exact(f"{what}: layer {layer} v cache", av, ev)


def _check_stats(chk: Checker, what: str, stats: Any, nbytes: int) -> None:
    if stats.bytes != nbytes:
        chk.fail(f"{what}: stats report {stats.bytes} bytes, expected {nbytes}")


def _check(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    p, dtype, label = case.p, case.dtype, case.label
    gen = generator(case.seed)
    bs, hkv, layers = p["bs"], p["hkv"], p["L"]
    nbytes_per_token = 2 * layers * hkv * p["d"] * torch.empty((), dtype=dtype).element_size()
    src = _caches(backend, gen, p, 12, dtype, hkv)
    dst = _caches(backend, gen, p, 16, dtype, 2 * hkv if label == "mismatch" else hkv)
    src_host, dst_before = _host(src), _host(dst)
    # Out-of-order, partly consecutive ids on both sides: coalescing and ordering both matter.
    src_ids, dst_ids = [7, 2, 3, 10], [11, 4, 5, 1]
    tokens = 4 * bs if label == "full" else 3 * bs + 5
    sender = backend.create_kv_transfer(name="conformance-sender")
    receiver: KVTransferEngine | None = None
    try:
        receiver = backend.create_kv_transfer(name="conformance-receiver")
        if label == "mismatch":
            _check_mismatch(chk, sender, receiver, src, dst, src_ids, dst_ids, tokens)
        elif label == "interleaved":
            _check_interleaved(chk, sender, receiver, src, dst, src_host, dst_before, bs, nbytes_per_token)
        else:
            done = receiver.expect("t0", dst, dst_ids, tokens, timeout_s=_TIMEOUT_S)
            if label == "layerwise":
                for layer in range(layers):
                    sender.send(
                        receiver.address, "t0", src, src_ids, tokens, layers=[layer], timeout_s=_TIMEOUT_S
                    )
            else:
                stats = sender.send(receiver.address, "t0", src, src_ids, tokens, timeout_s=_TIMEOUT_S)
                _check_stats(chk, "send", stats, tokens * nbytes_per_token)
            _check_stats(chk, "receive", done.result(_TIMEOUT_S), tokens * nbytes_per_token)
            expected = _expected(src_host, dst_before, src_ids, dst_ids, tokens)
            _compare(chk, label, dst, expected)
            if label == "layerwise":  # the same transfer in one batch lands identically
                dst2 = _caches(backend, gen, p, 16, dtype, hkv)
                dst2_before = _host(dst2)
                done2 = receiver.expect("t1", dst2, dst_ids, tokens, timeout_s=_TIMEOUT_S)
                sender.send(receiver.address, "t1", src, src_ids, tokens, timeout_s=_TIMEOUT_S)
                done2.result(_TIMEOUT_S)
                _compare(chk, "batch", dst2, _expected(src_host, dst2_before, src_ids, dst_ids, tokens))
        _check_src_untouched(chk, src, src_host)
    finally:
        sender.close()
        if receiver is not None:
            receiver.close()
    for name, engine in (("sender", sender), ("receiver", receiver)):
        st = engine.state() if engine is not None else None
        if st is not None and (
            st.pending_receives or st.active_sends or st.open_connections or st.staging_bytes
        ):
            chk.fail(f"{name} still holds resources after close: {st}")


def _check_src_untouched(chk: Checker, src: list, src_host: list) -> None:
    _compare(chk, "source after sending", src, src_host)


def _check_interleaved(
    chk: Checker,
    sender: KVTransferEngine,
    receiver: KVTransferEngine,
    src: list,
    dst: list,
    src_host: list,
    dst_before: list,
    bs: int,
    nbytes_per_token: int,
) -> None:
    # A: 2.5 blocks, layer by layer; B: 1.25 blocks, all layers; all calls in flight together.
    a_src, a_dst, a_tok = [1, 2, 9], [3, 14, 15], 2 * bs + bs // 2
    b_src, b_dst, b_tok = [5, 6], [8, 6], bs + bs // 4
    done_a = receiver.expect("A", dst, a_dst, a_tok, timeout_s=_TIMEOUT_S)
    done_b = receiver.expect("B", dst, b_dst, b_tok, timeout_s=_TIMEOUT_S)
    calls = [
        sender.send_async(receiver.address, "A", src, a_src, a_tok, layers=[layer], timeout_s=_TIMEOUT_S)
        for layer in range(len(src))
    ]
    calls.insert(1, sender.send_async(receiver.address, "B", src, b_src, b_tok, timeout_s=_TIMEOUT_S))
    for fut in concurrent.futures.as_completed(calls, timeout=_TIMEOUT_S):
        fut.result()
    _check_stats(chk, "transfer A", done_a.result(_TIMEOUT_S), a_tok * nbytes_per_token)
    _check_stats(chk, "transfer B", done_b.result(_TIMEOUT_S), b_tok * nbytes_per_token)
    expected = _expected(src_host, dst_before, a_src, a_dst, a_tok)
    expected = _expected(src_host, expected, b_src, b_dst, b_tok)
    _compare(chk, "interleaved A and B", dst, expected)


def _check_mismatch(
    chk: Checker,
    sender: KVTransferEngine,
    receiver: KVTransferEngine,
    src: list,
    dst: list,
    src_ids: list[int],
    dst_ids: list[int],
    tokens: int,
) -> None:
    dst_before = _host(dst)
    done = receiver.expect("m", dst, dst_ids, tokens, timeout_s=_TIMEOUT_S)
    for side, call in (
        ("sender", lambda: sender.send(receiver.address, "m", src, src_ids, tokens, timeout_s=_TIMEOUT_S)),
        ("receiver", lambda: done.result(_TIMEOUT_S)),
    ):
        try:
            call()
        except KVLayoutMismatchError as exc:
            text = str(exc)
            missing = [
                w for w in (sender.address, receiver.address, exc.transport, "num_kv_heads") if w not in text
            ]
            if missing:
                chk.fail(f"{side}'s error does not name {missing}: {text}")
        except KVTransferError as exc:
            chk.fail(f"{side} raised {type(exc).__name__}, expected KVLayoutMismatchError: {exc}")
        else:
            chk.fail(f"{side}: a transfer between caches with different head counts succeeded")
    _compare(chk, "receiver cache after a refused transfer", dst, dst_before)


register_kind(
    "kv_transfer",
    _build,
    _check,
    uses_reference=False,
    description="KV blocks moved between two caches over the backend's transfer engine, bit-exact",
)
