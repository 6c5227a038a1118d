"""KV transfer, the HAL's point-to-point part for prefill/decode disaggregation: the contract.

A prefill instance and a decode instance are separate processes (separate servers, possibly on
separate hosts) that share no torch.distributed group. Each owns one `KVTransferEngine`, made by
`Backend.create_kv_transfer()`, and publishes its `address`. A transfer moves one request's KV
from blocks of the sender's paged cache into blocks the receiver allocated (different ids), and is
named by a `transfer_id` both sides agree on (the request id, say):

    # decode instance (receiver): allocate blocks first, then announce them
    done = engine.expect("req-7", kv_caches, block_ids=[12, 40, 41], num_tokens=37)
    ...                                       # tell the prefill side: address + block ids
    stats = done.result(timeout=30)           # or engine.wait("req-7", 30), or done.add_done_callback

    # prefill instance (sender), after the step that wrote the KV has finished on the device
    stats = engine.send(decode_address, "req-7", kv_caches, block_ids=[3, 4, 9], num_tokens=37)
    # or layer by layer, as each layer's KV is ready: send(..., layers=[i]) per layer (or group)

What moves: for every layer, K then V, the first `num_tokens` token rows of the listed blocks in
order, so the last block may be partial; the rows of that block past `num_tokens` are left as
they were on the receiver. The receiver's future resolves once every layer has arrived and been
written; a send returns once the receiver has written what it sent.

Why a per-instance engine and not `Communicator.send`: a communicator is a fixed torch.distributed
group (ranks known at start), while prefill and decode instances come and go and pair up per
request. Why the receiver announces first (`expect`), as SGLang's decode side allocates before the
prefill side pushes: the sender never needs to know the receiver's memory, only its block ids, and
the receiver can validate the layout before a byte lands in its cache. Why a `Future`: the engine
loop can poll it (`done()`) each step, as SGLang's decode loop polls its receivers, or block.

Failure rules: anything that goes wrong raises (or resolves the future with) a `KVTransferError`
whose message names both endpoints and the transport. A failed or cancelled transfer is final:
the caller frees its blocks; nothing is retried behind its back and nothing stays allocated in the
engine (`state()` shows what is held).
"""

from __future__ import annotations

import concurrent.futures
import threading
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import torch

from xllm.hal.errors import HALError

# What `allocate_kv_cache` returns: (k_cache, v_cache) per layer, each
# [num_blocks, block_size, num_kv_heads, head_dim] (the NHD layout).
KVCaches = Sequence[tuple[torch.Tensor, torch.Tensor]]


class KVTransferError(HALError, RuntimeError):
    """A transfer that could not be set up, broke, or was refused.

    The message reads ``kv transfer 'ID' LOCAL -> PEER over TRANSPORT: REASON`` (sender first),
    so a log line or a failed request says which two instances and which transport were involved.
    """

    def __init__(
        self,
        reason: str,
        *,
        transfer_id: str | None = None,
        source: str | None = None,
        destination: str | None = None,
        transport: str = "tcp",
    ) -> None:
        self.reason = reason
        self.transfer_id = transfer_id
        self.source = source
        self.destination = destination
        self.transport = transport
        what = "kv transfer" if transfer_id is None else f"kv transfer {transfer_id!r}"
        super().__init__(f"{what} {source or '?'} -> {destination or '?'} over {transport}: {reason}")

    def __reduce__(self) -> tuple[Any, ...]:
        # Keyword-only fields: the default pickling (args only) could not rebuild it in another
        # process (a transfer pool, the engine's worker).
        return (
            _rebuild_error,
            (type(self), self.reason, self.transfer_id, self.source, self.destination, self.transport),
        )


def _rebuild_error(
    cls: type[KVTransferError],
    reason: str,
    transfer_id: str | None,
    source: str | None,
    destination: str | None,
    transport: str,
) -> KVTransferError:
    return cls(reason, transfer_id=transfer_id, source=source, destination=destination, transport=transport)


class KVLayoutMismatchError(KVTransferError):
    """Sender and receiver caches disagree on layers, block size, heads, head dim, dtype, or the
    receiver allocated a different number of blocks or tokens than the sender sends."""


class KVTransferCancelled(KVTransferError):
    """`cancel` was called for the transfer on this side or the peer's (or the engine closed)."""


class KVTransferTimeout(KVTransferError):
    """A send or an expected transfer did not finish in time."""


@dataclass(frozen=True, slots=True)
class KVLayout:
    """What both sides must agree on, sent in every transfer's header. The number of blocks is
    not part of it: each instance sizes its own cache."""

    num_layers: int
    block_size: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # torch dtype name without "torch.", e.g. "bfloat16"

    @property
    def token_bytes(self) -> int:
        """Bytes of one token's K (or V) in one layer."""
        return self.num_kv_heads * self.head_dim * torch.empty((), dtype=self.torch_dtype).element_size()

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @classmethod
    def of(cls, kv_caches: KVCaches) -> KVLayout:
        """The layout of caches as `allocate_kv_cache` returns them; ValueError when they are not
        such caches (empty, not 4-d, K and V or layers of different shape or dtype)."""
        if not kv_caches:
            raise ValueError("kv transfer: argument 'kv_caches' is empty")
        k0 = kv_caches[0][0]
        for i, pair in enumerate(kv_caches):
            if len(pair) != 2:
                raise ValueError(f"kv transfer: kv_caches[{i}] must be a (k_cache, v_cache) pair")
            for name, t in zip(("k", "v"), pair, strict=True):
                if not isinstance(t, torch.Tensor) or t.dim() != 4:
                    raise ValueError(
                        f"kv transfer: kv_caches[{i}] {name} cache must be a 4-d tensor "
                        "[num_blocks, block_size, num_kv_heads, head_dim]"
                    )
                if t.shape != k0.shape or t.dtype != k0.dtype:
                    raise ValueError(
                        f"kv transfer: kv_caches[{i}] {name} cache is {tuple(t.shape)} {t.dtype}, "
                        f"layer 0's k cache is {tuple(k0.shape)} {k0.dtype}"
                    )
        _, block_size, heads, head_dim = k0.shape
        return cls(len(kv_caches), block_size, heads, head_dim, str(k0.dtype).removeprefix("torch."))

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> KVLayout:
        return cls(
            int(d["num_layers"]),
            int(d["block_size"]),
            int(d["num_kv_heads"]),
            int(d["head_dim"]),
            str(d["dtype"]),
        )

    def differences(self, other: KVLayout, mine: str = "sender", theirs: str = "receiver") -> list[str]:
        """One ``field X (mine) != Y (theirs)`` line per field that differs."""
        return [
            f"{f} {getattr(self, f)} ({mine}) != {getattr(other, f)} ({theirs})"
            for f in ("num_layers", "block_size", "num_kv_heads", "head_dim", "dtype")
            if getattr(self, f) != getattr(other, f)
        ]


@dataclass(frozen=True, slots=True)
class TransferStats:
    """One finished send (sender side) or one completed expected transfer (receiver side)."""

    transfer_id: str
    peer: str  # the other side's address
    bytes: int  # KV payload bytes, headers not counted
    blocks: int
    layers: int  # layers moved by this call (sender) or in the whole transfer (receiver)
    tokens: int
    seconds: float  # sender: connect to the receiver's ack; receiver: first header to last write

    @property
    def gbytes_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0


@dataclass(frozen=True, slots=True)
class TransferEngineState:
    """What an engine holds now and has done so far (for /metrics and leak checks)."""

    address: str
    transport: str
    pending_receives: int  # expected transfers not finished yet
    active_sends: int
    open_connections: int  # accepted connections being served
    staging_bytes: int  # host staging buffers allocated now
    sends_ok: int
    receives_ok: int
    failures: int  # sends and receives that ended in an error (cancellations included)
    bytes_sent: int
    bytes_received: int


def check_transfer_args(
    layout: KVLayout,
    num_blocks: int,
    block_ids: Sequence[int],
    num_tokens: int,
    layers: Sequence[int] | None,
) -> tuple[list[int], list[int]]:
    """Validated (block ids, layers) as plain int lists; ValueError names the bad argument.

    `num_tokens` must fill every listed block but the last, which holds 1..block_size of them:
    a block list that is too long or too short for the tokens is a bookkeeping bug upstream.
    """
    ids = [int(b) for b in block_ids]
    if not ids:
        raise ValueError("kv transfer: argument 'block_ids' is empty")
    bad = [b for b in ids if not 0 <= b < num_blocks]
    if bad:
        raise ValueError(f"kv transfer: block ids {bad[:8]} are outside the cache's {num_blocks} blocks")
    if len(set(ids)) != len(ids):
        raise ValueError(f"kv transfer: argument 'block_ids' repeats a block: {ids[:16]}")
    lo, hi = (len(ids) - 1) * layout.block_size + 1, len(ids) * layout.block_size
    if not lo <= num_tokens <= hi:
        raise ValueError(
            f"kv transfer: {len(ids)} blocks of {layout.block_size} hold {lo}..{hi} tokens, "
            f"argument 'num_tokens' is {num_tokens}"
        )
    if layers is None:
        chosen = list(range(layout.num_layers))
    else:
        chosen = sorted(int(i) for i in layers)
        if (
            not chosen
            or len(set(chosen)) != len(chosen)
            or not all(0 <= i < layout.num_layers for i in chosen)
        ):
            raise ValueError(
                f"kv transfer: argument 'layers' must be distinct layer indices in [0, {layout.num_layers}), "
                f"got {list(layers)}"
            )
    return ids, chosen


class KVTransferEngine(ABC):
    """One instance's endpoint for sending and receiving KV blocks. Thread-safe: the engine
    thread, a transfer pool and request handlers may call it at once, for different transfers.

    Lifecycle: `Backend.create_kv_transfer()` returns it started (listening at `address`);
    `close()` cancels everything in flight and releases sockets, threads and buffers. It is a
    context manager too.
    """

    transport: ClassVar[str]  # "tcp", "nccl", ...: named in every KVTransferError

    def __init__(self) -> None:
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._executor_lock = threading.Lock()

    @property
    @abstractmethod
    def address(self) -> str:
        """Where peers reach this engine, e.g. ``tcp://10.0.0.5:41234``: what to publish."""

    @abstractmethod
    def start(self) -> KVTransferEngine:
        """Starts serving `address` (idempotent); returns self."""

    @abstractmethod
    def send(
        self,
        peer: str,
        transfer_id: str,
        kv_caches: KVCaches,
        block_ids: Sequence[int],
        num_tokens: int,
        layers: Sequence[int] | None = None,
        timeout_s: float | None = None,
    ) -> TransferStats:
        """Sends the first `num_tokens` tokens' K and V held in `block_ids` of `kv_caches`, for
        `layers` (default all), to the engine at `peer`, where `expect(transfer_id, ...)` names
        the destination blocks. Blocks until the receiver has written them.

        The KV being sent must be complete on the device when this is called (the caller has
        synchronised the step, or the event of the last layer sent). Calls for disjoint layer
        sets of one transfer may follow each other or run concurrently (layer by layer).
        Raises ValueError for bad arguments, KVTransferError for anything on the way
        (KVLayoutMismatchError, KVTransferCancelled, KVTransferTimeout are subclasses).
        """

    @abstractmethod
    def expect(
        self,
        transfer_id: str,
        kv_caches: KVCaches,
        block_ids: Sequence[int],
        num_tokens: int,
        timeout_s: float | None = None,
    ) -> concurrent.futures.Future[TransferStats]:
        """Announces that `transfer_id` will arrive into `block_ids` of `kv_caches` (all layers,
        `num_tokens` tokens). The future resolves with the stats once every layer is written, or
        with a KVTransferError when it fails, is cancelled, or is not complete `timeout_s` after
        this call (default: the engine's `expect_timeout_s`), so a sender that never comes
        cannot hold the receiver's blocks forever. Until it resolves, the blocks belong to the
        transfer: do not read or reuse them."""

    @abstractmethod
    def cancel(self, transfer_id: str, reason: str = "cancelled") -> bool:
        """Aborts `transfer_id` on this side, whether expected here or being sent from here:
        closes its connections (the peer sees KVTransferCancelled), frees its staging buffers,
        and resolves its future with KVTransferCancelled. True if there was something to cancel.
        A transfer cancelled before its data arrives is refused when it does."""

    @abstractmethod
    def state(self) -> TransferEngineState: ...

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def _future(self, transfer_id: str) -> concurrent.futures.Future[TransferStats] | None:
        """The future of a pending or recently finished expected transfer."""

    # ------------------------------------------------------------------ shared conveniences

    def wait(self, transfer_id: str, timeout_s: float | None = None) -> TransferStats:
        """Blocks until the expected `transfer_id` is complete and returns its stats; raises its
        KVTransferError, or KVTransferTimeout when `timeout_s` passes first (the transfer then
        stays pending: `cancel` it to give up). Works for recently finished transfers too."""
        fut = self._future(transfer_id)
        if fut is None:
            raise KeyError(f"kv transfer {transfer_id!r} is not expected by {self.address}")
        try:
            return fut.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise KVTransferTimeout(
                f"not complete after {timeout_s} s of waiting",
                transfer_id=transfer_id,
                source="?",
                destination=self.address,
                transport=self.transport,
            ) from None

    def send_async(
        self,
        peer: str,
        transfer_id: str,
        kv_caches: KVCaches,
        block_ids: Sequence[int],
        num_tokens: int,
        layers: Sequence[int] | None = None,
        timeout_s: float | None = None,
    ) -> concurrent.futures.Future[TransferStats]:
        """`send` on the engine's own small thread pool, so the caller's loop does not block."""
        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(
                    max_workers=4, thread_name_prefix="xllm-kv-send"
                )
            executor = self._executor
        return executor.submit(
            self.send, peer, transfer_id, kv_caches, block_ids, num_tokens, layers, timeout_s
        )

    def close(self) -> None:
        """Cancels what is in flight and releases every socket, thread and buffer (idempotent)."""
        self._close()
        with self._executor_lock:
            executor, self._executor = self._executor, None
        if executor is not None:
            executor.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> KVTransferEngine:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "KVCaches",
    "KVLayout",
    "KVLayoutMismatchError",
    "KVTransferCancelled",
    "KVTransferEngine",
    "KVTransferError",
    "KVTransferTimeout",
    "TransferEngineState",
    "TransferStats",
    "check_transfer_args",
]
