"""KV transfer for the CUDA backend: the HAL's TCP engine, with the KV bytes moved GPU to GPU over
NCCL when both ends can, and staged through pinned host memory when they cannot.

Control plane: unchanged TCP (`xllm.hal.tcp_kv_transfer`): header, layout validation, acks and
cancellation stay on the engine's connection. `NcclTransport` is the engine's `DeviceTransport`:
the sender offers NCCL in the header, the receiver takes it up when its destination caches are on
a GPU too, and only the payload moves over NCCL. Either side declining (no GPU, caches on the
host as in interpret mode, torch without NCCL, different NCCL versions, both ends on the same GPU)
leaves the transfer on TCP, staged through a pinned host buffer (`transport` "tcp" in errors and
stats; "nccl" when NCCL carried it, see `DeviceTransferStats`).

Why torch's low-level bindings (`torch.cuda.nccl.unique_id/init_rank/broadcast`): prefill and
decode instances are independent processes with no torch.distributed group between them, and
these need none. A 2-rank broadcast from the sender is a point-to-point send. torch's binding
broadcasts from rank 0 of the communicator (in the sources checked, `root` is only validated
against the length of the input list, one tensor here, and ncclBcast gets root 0), so the sender
is rank 0 and a communicator only carries one direction: each engine caches one per peer it sends to (keyed by the peer's address) and one per
peer it receives from (keyed by the id the sender gave it). Two instances that both send to each
other therefore hold two communicators, one per direction.

Per `send` call, over the connection:

    sender   header "device": {kind: "nccl", version, nccl, gpu, comm_id?}
    receiver ok "device": {transport: "nccl", need_uid?}      (or no "device": plain TCP)
    sender   {comm_id, uid}          (when the receiver knows no communicator by that id)
             both: init_rank(2, uid, 0 | 1) with that uid (the pair is then cached)
    per chunk of layers (K and V of each, at most `max_chunk_bytes` but one layer at least):
    sender   {"chunk": i, "layers": [...]}      receiver {"ready": i}
             both: broadcast one contiguous buffer, the sender's gathered from its blocks,
                   the receiver's scattered into its blocks
    receiver the engine's usual final ack once everything is written and synchronised

The uid is made only once the receiver asked for it: `ncclGetUniqueId` starts a bootstrap root
that waits for the ranks, so a uid offered to a receiver that declines would leak one.

Why the per-chunk go/ready: NCCL matches operations on a communicator by order, and several
transfers from one sender to one receiver run on concurrent connections. The sender holds its
communicator's lock from "go" until its broadcast completed and the receiver takes its own lock
before "ready", so both sides issue the broadcasts of one communicator in the same order. It also
means neither side enqueues a broadcast the other will never join, unless the peer dies between
"ready" and its broadcast.

Failure: NCCL errors, a set-up that never completes and a broadcast that does not finish by the
transfer's deadline fail the transfer (a `KVTransferError` over "nccl") and drop the
communicator; the next transfer to that peer builds a new one. torch exposes no
`ncclCommAbort`, and its communicator capsule does not call `ncclCommDestroy` (disabled in the
sources checked, for crashes at exit), so a dropped
communicator (and a set-up thread stuck waiting for a peer that never joins) is leaked rather than
freed: rare, bounded by the failures, and the reason each communicator gets its own stream, so a
wedged one cannot stall the model's stream. NIXL (RDMA reads of registered cache memory) would be
the next transport where it is installed.

Untested on GPU hardware (written on a machine without one): the protocol, chunking, caching and
failure handling run on the CPU in the tests with a host stand-in for the NCCL calls (`NcclOps`
is the seam; `tests/backends/cuda/test_cuda_kv_transfer.py`); the two-process GPU tests are
marked `gpu`.
"""

from __future__ import annotations

import logging
import secrets
import select
import socket
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from xllm.hal.kv_transfer import KVCaches, KVTransferEngine
from xllm.hal.tcp_kv_transfer import (
    DeviceTransport,
    DeviceTransportError,
    TcpKVTransferEngine,
    _read_frame,
    _write_frame,
)

log = logging.getLogger(__name__)

NCCL_PROTOCOL = 1  # bump when the "device" frames above change
DEFAULT_MAX_CHUNK_BYTES = 256 << 20  # one device buffer per chunk: bounds the extra GPU memory
# Communicators kept per peer and direction. Concurrent first sends to a peer (layer by layer)
# each build one; the older stay usable by transfers that named them, up to this many.
_KEPT_PER_PEER = 4


# ---------------------------------------------------------------------------------- pure logic


def token_rows(block_ids: Sequence[int], block_size: int, num_tokens: int) -> torch.Tensor:
    """Row indices, into a cache viewed as ``[num_blocks * block_size, heads, dim]``, of the first
    `num_tokens` tokens of `block_ids` in order (int64, on the CPU).

    One index per token row rather than per block is what lets a single `index_select` /
    `index_copy_` move a partial last block without touching its rows past `num_tokens`.
    """
    ids = torch.tensor(list(block_ids), dtype=torch.long)
    rows = ids[:, None] * block_size + torch.arange(block_size, dtype=torch.long)
    return rows.reshape(-1)[:num_tokens]


def plan_chunks(layers: Sequence[int], layer_bytes: int, max_chunk_bytes: int) -> list[list[int]]:
    """`layers` in order, grouped so each group's payload (`layer_bytes` each, K and V) stays within
    `max_chunk_bytes`; a layer bigger than that travels alone."""
    per_chunk = max(1, max_chunk_bytes // max(1, layer_bytes))
    order = list(layers)
    return [order[i : i + per_chunk] for i in range(0, len(order), per_chunk)]


def gather_layers(kv_caches: KVCaches, layers: Sequence[int], rows: torch.Tensor, out: torch.Tensor) -> None:
    """K then V of each of `layers`, token rows `rows`, into `out` [len(layers), 2, tokens, heads,
    dim] (the order TCP sends them in)."""
    for i, layer in enumerate(layers):
        for j, cache in enumerate(kv_caches[layer]):
            torch.index_select(_rows_view(cache), 0, rows, out=out[i, j])


def scatter_layers(kv_caches: KVCaches, layers: Sequence[int], rows: torch.Tensor, src: torch.Tensor) -> None:
    """What `gather_layers` packed, into token rows `rows` of each of `layers`' K and V."""
    for i, layer in enumerate(layers):
        for j, cache in enumerate(kv_caches[layer]):
            _rows_view(cache).index_copy_(0, rows, src[i, j])


def _rows_view(cache: torch.Tensor) -> torch.Tensor:
    return cache.view(-1, *cache.shape[2:])


@dataclass(frozen=True, slots=True)
class NcclEndpoint:
    """What one end tells the other so both can decide whether NCCL can connect them."""

    nccl: str  # NCCL version, "2.21.5"
    gpu: str  # the GPU's UUID: equal on both ends means one device


def negotiate(offer: dict[str, Any] | None, local: NcclEndpoint | None) -> str | None:
    """Why the receiver must decline an NCCL offer (the transfer then goes over TCP), or None when
    NCCL can carry it."""
    if not offer or offer.get("kind") != "nccl":
        return "the sender offers no NCCL"
    if local is None:
        return "the receiver cannot use NCCL for these caches"
    if offer.get("version") != NCCL_PROTOCOL:
        return f"nccl transfer protocol {offer.get('version')} (receiver speaks {NCCL_PROTOCOL})"
    if offer.get("nccl") != local.nccl:
        # Mixed NCCL versions in one communicator are not supported by NCCL.
        return f"NCCL {offer.get('nccl')} (sender) != {local.nccl} (receiver)"
    if offer.get("gpu") == local.gpu:
        # NCCL refuses two ranks on one device ("Duplicate GPU detected"): staged TCP works there.
        return "both ends are on the same GPU"
    return None


# ---------------------------------------------------------------------------------- device ops


class NcclOps:
    """The CUDA and NCCL calls the transport makes, in one place so the tests can run the protocol
    on the CPU with stand-ins."""

    def usable(self, t: torch.Tensor) -> bool:
        return t.is_cuda

    def endpoint(self, device: torch.device) -> NcclEndpoint | None:
        if not torch.cuda.is_available() or not hasattr(torch._C, "_nccl_unique_id"):
            return None
        props = torch.cuda.get_device_properties(device)
        gpu = str(getattr(props, "uuid", "")) or f"{socket.gethostname()}/cuda:{device.index}"
        return NcclEndpoint(".".join(str(x) for x in torch.cuda.nccl.version()), gpu)

    def unique_id(self) -> bytes:
        return torch.cuda.nccl.unique_id()

    def init_rank(self, uid: bytes, rank: int, device: torch.device) -> Any:
        with torch.cuda.device(device):  # ncclCommInitRank binds the current device
            return torch.cuda.nccl.init_rank(2, uid, rank)

    def new_stream(self, device: torch.device) -> Any:
        return torch.cuda.Stream(device=device)

    @contextmanager
    def on_stream(self, stream: Any, device: torch.device) -> Iterator[None]:
        """Runs the block on `stream`, ordered after the device's current stream.

        The contract has the caller synchronise the step that wrote the KV; ordering after the
        current (default) stream on the GPU covers a caller that only launched it there, without
        a device-wide synchronize, which would also wait on other peers' NCCL kernels.
        """
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            yield

    def broadcast(self, buf: torch.Tensor, comm: Any, stream: Any) -> None:
        # root=0: the binding always broadcasts from the communicator's rank 0 (the sender).
        # Bytes, so any cache dtype (bfloat16, fp8) goes through whatever NCCL supports.
        torch.cuda.nccl.broadcast([buf.view(torch.uint8)], root=0, streams=[stream], comms=[comm])

    def wait(self, stream: Any, deadline: float, abort: Callable[[], bool] | None = None) -> bool:
        """Whether the work queued on `stream` finished before `deadline` or `abort()`.

        Polls rather than synchronizes: a peer that dies before joining the broadcast must not
        hang this thread (the kernel itself stays stuck; the caller drops the communicator).
        """
        done = torch.cuda.Event()
        done.record(stream)
        polls = 0
        while not done.query():
            polls += 1
            if time.monotonic() > deadline or (abort is not None and polls % 50 == 0 and abort()):
                return False
            time.sleep(0.0002)
        return True


@dataclass(eq=False)
class _Comm:
    comm_id: str
    comm: Any
    stream: Any
    device: torch.device
    peer: str  # send side: the receiver's address; receive side: the sender's label
    lock: threading.Lock = field(default_factory=threading.Lock)


class NcclTransport(DeviceTransport):
    """See the module docstring. `max_chunk_bytes` bounds the device buffer of one broadcast;
    `init_timeout_s` how long communicator set-up waits for the peer; `ops` the CUDA/NCCL calls."""

    name: ClassVar[str] = "nccl"

    def __init__(
        self,
        *,
        max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
        init_timeout_s: float = 30.0,
        ops: NcclOps | None = None,
    ) -> None:
        self.max_chunk_bytes = max_chunk_bytes
        self.init_timeout_s = init_timeout_s
        self.ops = ops or NcclOps()
        self._lock = threading.Lock()
        # (peer address, device index) -> the communicator offered to that peer now
        self._send_comms: dict[tuple[str, int | None], _Comm] = {}
        self._send_by_id: dict[str, _Comm] = {}  # every live send communicator, oldest first
        self._recv_comms: dict[str, _Comm] = {}  # comm id -> communicator, oldest first
        self._closed = False

    # ------------------------------------------------------------------ negotiation

    def _endpoint(self, kv_caches: KVCaches) -> tuple[NcclEndpoint, torch.device] | None:
        tensors = [t for pair in kv_caches for t in pair]
        device = tensors[0].device
        if not all(self.ops.usable(t) and t.device == device and t.is_contiguous() for t in tensors):
            return None
        endpoint = self.ops.endpoint(device)
        return None if endpoint is None else (endpoint, device)

    def offer(self, kv_caches: KVCaches, peer: str) -> dict[str, Any] | None:
        found = self._endpoint(kv_caches)
        if found is None or self._closed:
            return None
        endpoint, device = found
        offer: dict[str, Any] = {
            "kind": "nccl",
            "version": NCCL_PROTOCOL,
            "nccl": endpoint.nccl,
            "gpu": endpoint.gpu,
        }
        with self._lock:
            cached = self._send_comms.get((peer, device.index))
        if cached is not None:
            offer["comm_id"] = cached.comm_id
        return offer

    def accept(self, offer: dict[str, Any], kv_caches: KVCaches, sender: str) -> dict[str, Any] | None:
        found = self._endpoint(kv_caches)
        why = negotiate(offer, None if found is None else found[0])
        if why is not None or self._closed:
            log.debug("kv transfer from %s over tcp, not nccl: %s", sender, why or "closing")
            return None
        answer: dict[str, Any] = {"transport": "nccl"}
        with self._lock:
            known = offer.get("comm_id") in self._recv_comms
        if not known:
            answer["need_uid"] = True  # first contact, or we restarted or dropped it after an error
        return answer

    # ------------------------------------------------------------------ payload

    def send_payload(
        self,
        sock: socket.socket,
        peer: str,
        offer: dict[str, Any],
        answer: dict[str, Any],
        kv_caches: KVCaches,
        block_ids: list[int],
        num_tokens: int,
        layers: list[int],
        deadline: float,
        check_cancelled: Callable[[int], None],
    ) -> int:
        device = kv_caches[0][0].device
        key = (peer, device.index)
        fresh = None
        if answer.get("need_uid"):
            fresh = _new_comm_fields(self.ops)
            _write_frame(sock, fresh)
        if fresh is not None:
            comm = self._init(fresh, 0, device, peer, deadline, lambda: _peer_gone(sock))
            with self._lock:
                self._send_comms[key] = comm
                _keep(self._send_by_id, comm)
        else:
            with self._lock:
                comm = self._send_by_id.get(str(offer.get("comm_id")))
            if comm is None:
                raise DeviceTransportError(
                    "the NCCL communicator was dropped meanwhile (an error on another transfer)"
                )
        rows = token_rows(block_ids, kv_caches[0][0].shape[1], num_tokens).to(device)
        shape = kv_caches[0][0].shape[2:]
        layer_bytes = 2 * num_tokens * shape.numel() * kv_caches[0][0].element_size()
        sent = 0
        for i, chunk in enumerate(plan_chunks(layers, layer_bytes, self.max_chunk_bytes)):
            check_cancelled(sent)
            with comm.lock:
                _write_frame(sock, {"chunk": i, "layers": chunk})
                reply = _read_frame(sock)
                if reply.get("ready") != i:
                    raise DeviceTransportError(
                        f"receiver not ready for chunk {i}: {reply.get('error', reply)}"
                    )
                try:
                    with self.ops.on_stream(comm.stream, device):
                        buf = torch.empty(
                            (len(chunk), 2, num_tokens, *shape), dtype=kv_caches[0][0].dtype, device=device
                        )
                        gather_layers(kv_caches, chunk, rows, buf)
                        self.ops.broadcast(buf, comm.comm, comm.stream)
                    finished = self.ops.wait(comm.stream, deadline, lambda: _peer_gone(sock))
                except Exception as exc:  # noqa: BLE001 - whatever NCCL raised, the communicator is suspect
                    self._drop(comm)
                    raise DeviceTransportError(f"NCCL send failed: {type(exc).__name__}: {exc}") from exc
                del buf
                if not finished:
                    self._drop(comm)
                    raise DeviceTransportError(
                        f"NCCL send of chunk {i} did not finish (receiver gone or past the deadline)"
                    )
            sent += len(chunk) * layer_bytes
        return sent

    def receive_payload(
        self,
        sock: socket.socket,
        sender: str,
        offer: dict[str, Any],
        answer: dict[str, Any],
        kv_caches: KVCaches,
        block_ids: list[int],
        num_tokens: int,
        layers: list[int],
        deadline: float,
    ) -> int:
        device = kv_caches[0][0].device
        fresh = _read_frame(sock) if answer.get("need_uid") else None
        if fresh is not None:
            comm = self._init(fresh, 1, device, sender, deadline, lambda: _peer_gone(sock))
            with self._lock:
                _keep(self._recv_comms, comm)
        else:
            with self._lock:
                found = self._recv_comms.get(str(offer.get("comm_id")))
            if found is None:
                raise DeviceTransportError(
                    "the NCCL communicator was dropped meanwhile (an error on another transfer)"
                )
            comm = found
        rows = token_rows(block_ids, kv_caches[0][0].shape[1], num_tokens).to(device)
        shape = kv_caches[0][0].shape[2:]
        layer_bytes = 2 * num_tokens * shape.numel() * kv_caches[0][0].element_size()
        left = list(layers)
        got = 0
        i = 0
        while left:
            go = _read_frame(sock)
            chunk = [int(x) for x in go.get("layers", [])]
            if go.get("chunk") != i or not chunk or chunk != left[: len(chunk)]:
                _write_frame(sock, {"ready": None, "error": f"unexpected chunk {go}"})
                raise DeviceTransportError(f"the sender's chunk {go} does not follow the layers {left}")
            with comm.lock:
                try:
                    with self.ops.on_stream(comm.stream, device):
                        buf = torch.empty(
                            (len(chunk), 2, num_tokens, *shape), dtype=kv_caches[0][0].dtype, device=device
                        )
                        _write_frame(sock, {"ready": i})
                        self.ops.broadcast(buf, comm.comm, comm.stream)
                        scatter_layers(kv_caches, chunk, rows, buf)
                    finished = self.ops.wait(comm.stream, deadline, lambda: _peer_gone(sock))
                except OSError:
                    raise
                except Exception as exc:  # noqa: BLE001 - whatever NCCL raised, the communicator is suspect
                    self._drop(comm)
                    raise DeviceTransportError(f"NCCL receive failed: {type(exc).__name__}: {exc}") from exc
                del buf
                if not finished:
                    self._drop(comm)
                    raise DeviceTransportError(
                        f"NCCL receive of chunk {i} did not finish (sender gone, cancelled, or past the deadline)"
                    )
            left = left[len(chunk) :]
            got += len(chunk) * layer_bytes
            i += 1
        return got

    # ------------------------------------------------------------------ communicators

    def _init(
        self,
        fresh: dict[str, Any],
        rank: int,
        device: torch.device,
        peer: str,
        deadline: float,
        abort: Callable[[], bool],
    ) -> _Comm:
        """A pair communicator from the uid in `fresh`, this end being `rank` (0 sends).

        ncclCommInitRank blocks until the peer joins and cannot be interrupted through torch, so it
        runs on a helper thread that is abandoned (leaked) when the peer never comes.
        """
        uid = bytes.fromhex(str(fresh["uid"]))
        result: list[Any] = []

        def run() -> None:
            try:
                result.append(self.ops.init_rank(uid, rank, device))
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
                result.append(exc)

        t = threading.Thread(target=run, name="xllm-kv-nccl-init", daemon=True)
        t.start()
        give_up = min(time.monotonic() + self.init_timeout_s, deadline)
        while t.is_alive() and time.monotonic() < give_up and not abort():  # a peer that failed
            t.join(0.05)  # its own set-up closes the connection: do not wait out the timeout
        if not result:
            raise DeviceTransportError(
                f"NCCL communicator set-up with {peer} did not finish (the peer never joined)"
            )
        if isinstance(result[0], BaseException):
            exc = result[0]
            raise DeviceTransportError(
                f"NCCL communicator set-up failed: {type(exc).__name__}: {exc}"
            ) from exc
        return _Comm(str(fresh["comm_id"]), result[0], self.ops.new_stream(device), device, peer)

    def _drop(self, comm: _Comm) -> None:
        with self._lock:
            for key in [k for k, c in self._send_comms.items() if c is comm]:
                del self._send_comms[key]
            for by_id in (self._send_by_id, self._recv_comms):
                if by_id.get(comm.comm_id) is comm:
                    del by_id[comm.comm_id]
        log.warning(
            "kv transfer: dropped the NCCL communicator %s with %s after an error", comm.comm_id, comm.peer
        )

    def communicators(self) -> dict[str, int]:
        """How many communicators are cached, per direction (for tests and metrics)."""
        with self._lock:
            return {"send": len(self._send_by_id), "receive": len(self._recv_comms)}

    def close(self) -> None:
        # Forgetting them is all torch allows (no ncclCommDestroy through its binding).
        with self._lock:
            self._closed = True
            self._send_comms.clear()
            self._send_by_id.clear()
            self._recv_comms.clear()


def _keep(by_id: dict[str, _Comm], comm: _Comm) -> None:
    """Adds `comm`, forgetting the oldest of the same peer beyond `_KEPT_PER_PEER`."""
    by_id[comm.comm_id] = comm
    same = [cid for cid, c in by_id.items() if c.peer == comm.peer and c.device == comm.device]
    for cid in same[:-_KEPT_PER_PEER]:
        del by_id[cid]


def _peer_gone(sock: socket.socket) -> bool:
    """Whether the control connection was closed (the peer failed, or `cancel` shut it down), so a
    broadcast it will never join is not waited for until the deadline."""
    try:
        readable, _, _ = select.select([sock], [], [], 0)
        return bool(readable) and sock.recv(1, socket.MSG_PEEK) == b""
    except (OSError, ValueError):
        return True


def _new_comm_fields(ops: NcclOps) -> dict[str, Any]:
    return {"comm_id": secrets.token_hex(8), "uid": ops.unique_id().hex()}


def nccl_supported() -> bool:
    """Whether this process could offer NCCL at all (a GPU and a torch built with NCCL)."""
    return torch.cuda.is_available() and hasattr(torch._C, "_nccl_unique_id")


def create_cuda_kv_transfer(host: str, port: int, **options: object) -> KVTransferEngine:
    """A started TCP engine whose staging buffers are pinned when a GPU is visible, with the NCCL
    transport when NCCL is usable (``nccl=False`` turns it off; ``nccl_options`` go to
    `NcclTransport`)."""
    options.setdefault("pin_memory", torch.cuda.is_available())
    options.setdefault("synchronize", torch.cuda.synchronize)
    nccl = options.pop("nccl", None)
    nccl_options = options.pop("nccl_options", None) or {}
    if "device_transport" not in options and (nccl_supported() if nccl is None else bool(nccl)):
        options["device_transport"] = NcclTransport(**nccl_options)  # type: ignore[arg-type]
    return TcpKVTransferEngine(host, port, **options).start()  # type: ignore[arg-type]


__all__ = [
    "NcclEndpoint",
    "NcclOps",
    "NcclTransport",
    "create_cuda_kv_transfer",
    "gather_layers",
    "negotiate",
    "nccl_supported",
    "plan_chunks",
    "scatter_layers",
    "token_rows",
]
