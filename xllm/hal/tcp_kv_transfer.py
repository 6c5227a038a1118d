"""`TcpKVTransferEngine`: KV transfer over plain TCP, for every backend (the HAL's default).

Host caches (the CPU backend, CUDA's interpreter) move without a copy on either side: the sender
hands the cache's own bytes to the socket and the receiver reads straight into its destination
blocks. Device caches go through one host staging buffer per connection: gathered on the device
and copied to the host before sending, received on the host and scattered into the blocks after
(pinned when the backend asks for it), so a new backend gets transfer without writing any code.

Wire protocol, one TCP connection per `send` call (so concurrent transfers never share a stream
and a broken connection belongs to one transfer):

    sender   -> b"XKV1" + frame(header)        header: version, transfer_id, sender, layout,
                                               num_blocks, num_tokens, layers
    receiver -> frame({"ok": true}) or frame({"ok": false, "kind": ..., "error": ...})
    sender   -> for each layer in `layers`: K bytes, then V bytes, each the first num_tokens
                token rows of the blocks in order (num_tokens * token_bytes bytes)
    receiver -> frame({"ok": true}) once everything is written (or the error)

A frame is a 4-byte big-endian length and that many bytes of UTF-8 JSON. The receiver checks the
header against what `expect` announced before any payload is read, so a mismatch costs one round
trip and touches no block.

Device transports (`DeviceTransport`, e.g. CUDA's NCCL one) plug into the payload phase only: the
sender adds a "device" field to the header, the receiver answers with a "device" field in its ok
frame when it agrees, and then the transport moves the bytes (using this connection for its own
control frames) instead of the socket. Either side declining, or an engine without a transport,
leaves both fields out and the exchange above is unchanged byte for byte.
"""

from __future__ import annotations

import collections
import concurrent.futures
import json
import logging
import socket
import struct
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from xllm.hal.kv_transfer import (
    KVCaches,
    KVLayout,
    KVLayoutMismatchError,
    KVTransferCancelled,
    KVTransferEngine,
    KVTransferError,
    KVTransferTimeout,
    TransferEngineState,
    TransferStats,
    check_transfer_args,
)

log = logging.getLogger(__name__)

MAGIC = b"XKV1"
PROTOCOL_VERSION = 1
_LEN = struct.Struct("!I")
_MAX_FRAME = 1 << 20  # headers are small; anything bigger is not our peer
_REAP_INTERVAL_S = 0.2  # how often the accept loop looks for expired expectations
_FINISHED_KEPT = 1024  # finished futures kept so `wait` works shortly after completion


def parse_address(address: str) -> tuple[str, int]:
    """``tcp://host:port`` (host may be ``[v6]``) -> (host, port); ValueError otherwise."""
    if not address.startswith("tcp://"):
        raise ValueError(f"kv transfer address {address!r} is not tcp://host:port")
    hostport = address[len("tcp://") :]
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"kv transfer address {address!r} is not tcp://host:port")
    return host.strip("[]"), int(port)


def _format_address(host: str, port: int) -> str:
    return f"tcp://[{host}]:{port}" if ":" in host else f"tcp://{host}:{port}"


class _Refusal(Exception):
    """The receiver refuses a connection; `fatal` also fails the expected transfer."""

    def __init__(self, kind: str, reason: str, fatal: bool, expected: _Expected | None = None) -> None:
        super().__init__(reason)
        self.kind = kind
        self.reason = reason
        self.fatal = fatal
        self.expected = expected


class _Eof(ConnectionError):
    pass


class DeviceTransportError(Exception):
    """A device transport's payload phase failed; the engine reports it as a KVTransferError over
    that transport (the message is the reason)."""


@dataclass(frozen=True, slots=True)
class DeviceTransferStats(TransferStats):
    """`TransferStats` of a transfer whose payload moved over a device transport, which it names.
    Plain TCP transfers keep returning `TransferStats` (read ``getattr(s, "transport", "tcp")``)."""

    transport: str = "tcp"


class DeviceTransport(ABC):
    """The payload phase of a transfer on a device path, negotiated per connection.

    The engine keeps the TCP connection for the header, layout validation, acks and cancellation;
    a transport only decides whether it can carry a transfer (`offer` on the sender, `accept` on
    the receiver, both JSON-able dicts or None for "use TCP") and then moves the KV bytes. It may
    send its own frames over the connection (`_write_frame`/`_read_frame`), e.g. to keep both
    ends of a collective in step. Errors: raise `DeviceTransportError` (or let OSError from the
    socket through); the engine turns them into a `KVTransferError` over `name`.
    """

    name: ClassVar[str]

    @abstractmethod
    def offer(self, kv_caches: KVCaches, peer: str) -> dict[str, Any] | None:
        """Sender: the header's "device" field for sending from `kv_caches` to `peer`, or None."""

    @abstractmethod
    def accept(self, offer: dict[str, Any], kv_caches: KVCaches, sender: str) -> dict[str, Any] | None:
        """Receiver: the ok frame's "device" field taking up `offer`, or None to receive over TCP."""

    @abstractmethod
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
        """Moves the K and V of `layers` (the same rows, in the same order, as over TCP); returns
        the payload bytes. `check_cancelled(bytes_so_far)` raises once the send is cancelled."""

    @abstractmethod
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
        """Writes what `send_payload` moves into the blocks, synchronised with the device before it
        returns (the engine acks right after); returns the payload bytes."""

    def close(self) -> None:
        """Releases what the transport holds (communicators, streams); the engine is closing."""
        return None  # a transport that holds nothing needs no close


@dataclass(eq=False)
class _Expected:
    transfer_id: str
    kv_caches: KVCaches
    layout: KVLayout
    block_ids: list[int]
    num_tokens: int
    future: concurrent.futures.Future[TransferStats]
    deadline: float
    remaining: set[int]  # layers not yet written
    reserved: set[int] = field(default_factory=set)  # layers a connection is receiving now
    conns: set[socket.socket] = field(default_factory=set)
    sender: str = "?"
    bytes: int = 0
    started: float | None = None
    transport: str = "tcp"  # what carried the payload (a device transport's name when one did)


def _byte_view(t: torch.Tensor) -> memoryview:
    """The bytes of a contiguous host tensor, writable, sharing its memory (any dtype: bfloat16
    has no numpy type, its uint8 reinterpretation does)."""
    return memoryview(t.detach().view(torch.uint8).reshape(-1).numpy())


def _runs(ids: Sequence[int]) -> Iterator[tuple[int, int]]:
    """(first id, count) of each run of consecutive ids, in order: one contiguous slice each."""
    start, count = ids[0], 1
    for b in ids[1:]:
        if b == start + count:
            count += 1
        else:
            yield start, count
            start, count = b, 1
    yield start, count


def _token_views(cache: torch.Tensor, ids: Sequence[int], num_tokens: int) -> Iterator[torch.Tensor]:
    """Contiguous [tokens, heads, dim] views of a host cache covering the first `num_tokens`
    token rows of blocks `ids` in order (consecutive blocks coalesced into one view)."""
    block_size = cache.shape[1]
    left = num_tokens
    for start, count in _runs(ids):
        rows = min(count * block_size, left)
        yield cache[start : start + count].reshape(count * block_size, *cache.shape[2:])[:rows]
        left -= rows


class TcpKVTransferEngine(KVTransferEngine):
    """See the module docstring. Options (all keyword):

    name: this instance's id, put beside its address in error messages;
    advertise_host: the host peers should dial when binding a wildcard such as 0.0.0.0;
    pin_memory: page-locked staging for device caches (faster device copies; CUDA sets it);
    zero_copy: False stages host caches too (what device caches do; tests use it to run the
      staged path on the CPU);
    synchronize: ``f(device)`` waiting for device work (staged writes must land before the ack);
    connect_timeout_s, send_timeout_s: a send's connect and per-operation limits;
    expect_timeout_s: default lifetime of an expected transfer;
    arrival_wait_s: how long an incoming transfer waits for its `expect` (the two race);
    device_transport: a `DeviceTransport` offered for (and accepted from) peers, e.g. NCCL.
    """

    transport: ClassVar[str] = "tcp"

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        name: str | None = None,
        advertise_host: str | None = None,
        pin_memory: bool = False,
        zero_copy: bool = True,
        synchronize: Callable[[torch.device], None] | None = None,
        connect_timeout_s: float = 5.0,
        send_timeout_s: float = 60.0,
        expect_timeout_s: float = 120.0,
        arrival_wait_s: float = 5.0,
        device_transport: DeviceTransport | None = None,
    ) -> None:
        super().__init__()
        self._device = device_transport
        self.name = name
        self.pin_memory = pin_memory
        self.zero_copy = zero_copy
        self._synchronize = synchronize
        self.connect_timeout_s = connect_timeout_s
        self.send_timeout_s = send_timeout_s
        self.expect_timeout_s = expect_timeout_s
        self.arrival_wait_s = arrival_wait_s
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._listener = socket.socket(family, socket.SOCK_STREAM)
        try:
            self._listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._listener.bind((host, port))
            self._listener.listen(128)
            self._listener.settimeout(_REAP_INTERVAL_S)
        except OSError as exc:
            self._listener.close()
            raise KVTransferError(
                f"cannot listen on {host}:{port}: {exc}", source=name, destination=f"{host}:{port}"
            ) from exc
        bound_port = self._listener.getsockname()[1]
        if advertise_host is None:
            advertise_host = socket.getfqdn() if host in ("0.0.0.0", "::", "") else host
        self._address = _format_address(advertise_host, bound_port)
        self._cond = threading.Condition(threading.RLock())
        self._pending: dict[str, _Expected] = {}
        self._finished: collections.OrderedDict[str, concurrent.futures.Future[TransferStats]] = (
            collections.OrderedDict()
        )
        self._cancelled: collections.OrderedDict[str, str] = collections.OrderedDict()  # id -> reason
        self._sends: dict[str, set[socket.socket]] = {}
        self._cancelled_sends: set[str] = set()
        self._conns: set[socket.socket] = set()
        self._threads: set[threading.Thread] = set()
        self._staging_bytes = 0
        self._counts = collections.Counter[str]()
        self._accept_thread: threading.Thread | None = None
        self._closed = False

    # ------------------------------------------------------------------ identity, lifecycle

    @property
    def address(self) -> str:
        return self._address

    @property
    def label(self) -> str:
        """How this engine is named in errors: ``name (address)`` or the address."""
        return f"{self.name} ({self._address})" if self.name else self._address

    def start(self) -> TcpKVTransferEngine:
        with self._cond:
            if self._closed:
                raise KVTransferError("engine is closed", source=self.label, transport=self.transport)
            if self._accept_thread is None:
                self._accept_thread = threading.Thread(
                    target=self._accept_loop, name=f"xllm-kv-accept-{self._address}", daemon=True
                )
                self._accept_thread.start()
        return self

    def _close(self) -> None:
        with self._cond:
            if self._closed:
                return
            self._closed = True
            ids = list(self._pending) + list(self._sends)
        for tid in ids:
            self.cancel(tid, "engine closed")
        _shutdown(self._listener)  # wakes a blocked accept() at once (close alone does not)
        try:
            self._listener.close()
        except OSError:
            pass
        if self._accept_thread is not None:
            self._accept_thread.join(timeout=5)
        with self._cond:
            for s in self._conns:
                _shutdown(s)
            threads = list(self._threads)
            self._cond.notify_all()
        for t in threads:
            t.join(timeout=5)
        if self._device is not None:
            self._device.close()

    def state(self) -> TransferEngineState:
        with self._cond:
            c = self._counts
            return TransferEngineState(
                address=self._address,
                transport=self.transport if self._device is None else f"{self.transport}+{self._device.name}",
                pending_receives=len(self._pending),
                active_sends=len(self._sends),
                open_connections=len(self._conns),
                staging_bytes=self._staging_bytes,
                sends_ok=c["sends_ok"],
                receives_ok=c["receives_ok"],
                failures=c["failures"],
                bytes_sent=c["bytes_sent"],
                bytes_received=c["bytes_received"],
            )

    # ------------------------------------------------------------------ receiving side

    def expect(
        self,
        transfer_id: str,
        kv_caches: KVCaches,
        block_ids: Sequence[int],
        num_tokens: int,
        timeout_s: float | None = None,
    ) -> concurrent.futures.Future[TransferStats]:
        layout = KVLayout.of(kv_caches)
        ids, layers = check_transfer_args(layout, kv_caches[0][0].shape[0], block_ids, num_tokens, None)
        fut: concurrent.futures.Future[TransferStats] = concurrent.futures.Future()
        fut.set_running_or_notify_cancel()  # only the engine resolves it (see `cancel`)
        limit = self.expect_timeout_s if timeout_s is None else timeout_s
        with self._cond:
            if self._closed:
                raise KVTransferError(
                    "engine is closed",
                    transfer_id=transfer_id,
                    destination=self.label,
                    transport=self.transport,
                )
            if transfer_id in self._pending:
                raise ValueError(f"kv transfer {transfer_id!r} is already expected by {self._address}")
            self._finished.pop(transfer_id, None)
            self._cancelled.pop(transfer_id, None)  # a retry under the same id is a new transfer
            self._pending[transfer_id] = _Expected(
                transfer_id,
                list(kv_caches),
                layout,
                ids,
                num_tokens,
                fut,
                time.monotonic() + limit,
                set(layers),
            )
            self._cond.notify_all()  # a connection may be waiting for this expectation
        return fut

    def _future(self, transfer_id: str) -> concurrent.futures.Future[TransferStats] | None:
        with self._cond:
            exp = self._pending.get(transfer_id)
            return exp.future if exp is not None else self._finished.get(transfer_id)

    def cancel(self, transfer_id: str, reason: str = "cancelled") -> bool:
        with self._cond:
            exp = self._pending.get(transfer_id)
            sends = self._sends.get(transfer_id)
            if sends:
                self._cancelled_sends.add(transfer_id)
                for s in sends:
                    _shutdown(s)
            self._cancelled[transfer_id] = reason
            while len(self._cancelled) > _FINISHED_KEPT:
                self._cancelled.popitem(last=False)
        if exp is not None:
            self._fail(
                exp,
                KVTransferCancelled(
                    reason,
                    transfer_id=transfer_id,
                    source=exp.sender,
                    destination=self.label,
                    transport=self.transport,
                ),
            )
        return exp is not None or bool(sends)

    def _finish(self, exp: _Expected, result: TransferStats | KVTransferError) -> bool:
        """Moves `exp` out of pending and resolves its future (outside the lock: done callbacks
        may call back into the engine). False when it was already finished."""
        with self._cond:
            if self._pending.get(exp.transfer_id) is not exp:
                return False
            del self._pending[exp.transfer_id]
            self._finished[exp.transfer_id] = exp.future
            while len(self._finished) > _FINISHED_KEPT:
                self._finished.popitem(last=False)
            conns = list(exp.conns)
            self._counts["receives_ok" if isinstance(result, TransferStats) else "failures"] += 1
        if isinstance(result, TransferStats):
            exp.future.set_result(result)
        else:
            for s in conns:  # whoever streams into it stops now: its blocks are the caller's again
                _shutdown(s)
            exp.future.set_exception(result)
        return True

    def _fail(self, exp: _Expected, error: KVTransferError) -> None:
        if self._finish(exp, error):
            log.info("%s", error)  # the future carries it to the caller, who decides how loud it is

    def _accept_loop(self) -> None:
        while True:
            try:
                conn, _ = self._listener.accept()
            except TimeoutError:
                self._reap()
                continue
            except OSError:
                if self._closed:
                    return
                time.sleep(_REAP_INTERVAL_S)  # e.g. out of file descriptors: do not spin
                continue
            with self._cond:
                if self._closed:
                    conn.close()
                    return
                self._conns.add(conn)
                t = threading.Thread(target=self._serve, args=(conn,), name="xllm-kv-recv", daemon=True)
                self._threads.add(t)
            t.start()
            self._reap()

    def _reap(self) -> None:
        now = time.monotonic()
        with self._cond:
            expired = [e for e in self._pending.values() if e.deadline <= now]
            self._threads = {t for t in self._threads if t.is_alive() or t.ident is None}
        for exp in expired:
            self._fail(
                exp,
                KVTransferTimeout(
                    f"not complete within its timeout ({len(exp.remaining)} of {exp.layout.num_layers} "
                    "layers missing); its blocks are released",
                    transfer_id=exp.transfer_id,
                    source=exp.sender,
                    destination=self.label,
                    transport=self.transport,
                ),
            )

    def _serve(self, conn: socket.socket) -> None:
        """One incoming `send`: header, checks, payload straight into (or staged to) the blocks.

        The transfer's future is resolved only after this connection's socket and staging buffer
        are released, so whoever reacts to it (freeing blocks, checking `state()`) sees them gone.
        """
        exp: _Expected | None = None
        layers: list[int] = []
        sender = "?"
        got = total = 0
        staging: torch.Tensor | None = None
        outcome: tuple[_Expected, TransferStats | KVTransferError] | None = None
        transport = self.transport
        try:
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn.settimeout(self.send_timeout_s)
            if _read_exact(conn, len(MAGIC)) != MAGIC:
                raise _Refusal("protocol", "not an xllm kv transfer connection (bad magic)", False)
            header = _read_frame(conn)
            sender = str(header.get("sender", "?"))
            exp, layers = self._claim(header, conn)
            total = 2 * len(layers) * exp.num_tokens * exp.layout.token_bytes
            answer = self._accept_device(header, exp, sender)
            ok: dict[str, Any] = {"ok": True, "receiver": self.label}
            if answer is not None:
                ok["device"] = answer
            _write_frame(conn, ok)
            staged_devices: set[torch.device] = set()
            with torch.inference_mode():  # engines allocate caches as inference tensors
                if answer is not None and self._device is not None:
                    transport = exp.transport = self._device.name
                    got = self._device.receive_payload(
                        conn,
                        sender,
                        header["device"],
                        answer,
                        exp.kv_caches,
                        exp.block_ids,
                        exp.num_tokens,
                        layers,
                        time.monotonic() + self.send_timeout_s,
                    )
                    layers_to_stream: list[int] = []
                else:
                    layers_to_stream = layers
                for layer in layers_to_stream:
                    for cache in exp.kv_caches[layer]:
                        if self._direct(cache):
                            for view in _token_views(cache, exp.block_ids, exp.num_tokens):
                                got += _recv_into(conn, _byte_view(view))
                        else:
                            if staging is None:
                                staging = self._alloc_staging(exp.layout, exp.num_tokens, cache.device)
                            got += _recv_into(conn, _byte_view(staging))
                            _scatter(cache, exp.block_ids, staging)
                            staged_devices.add(cache.device)
                for dev in staged_devices:
                    self._sync(dev)
            stats = self._layers_done(exp, layers, got)
            if stats is not None:
                outcome = (exp, stats)
            try:
                _write_frame(conn, {"ok": True})
            except OSError:
                pass  # the data is written; a sender gone before the ack changes nothing here
        except _Refusal as r:
            if r.fatal and r.expected is not None:
                outcome = (
                    r.expected,
                    _error_for(r.kind, r.reason, r.expected.transfer_id, sender, self.label, transport),
                )
            try:
                _write_frame(conn, {"ok": False, "kind": r.kind, "error": r.reason})
            except OSError:
                pass
        except DeviceTransportError as exc:
            if exp is not None:
                outcome = (
                    exp,
                    KVTransferError(
                        str(exc),
                        transfer_id=exp.transfer_id,
                        source=sender,
                        destination=self.label,
                        transport=transport,
                    ),
                )
        except (OSError, ValueError, _Eof) as exc:
            if exp is not None:
                what = (
                    "timed out" if isinstance(exc, TimeoutError) else f"broke ({exc or type(exc).__name__})"
                )
                outcome = (
                    exp,
                    KVTransferError(
                        f"connection from the sender {what} after {got} of {total} payload bytes",
                        transfer_id=exp.transfer_id,
                        source=sender,
                        destination=self.label,
                        transport=transport,
                    ),
                )
        except Exception as exc:  # noqa: BLE001 - a device copy failing must still fail the transfer
            log.exception("kv transfer receive failed")
            if exp is not None:
                outcome = (
                    exp,
                    KVTransferError(
                        f"writing the received blocks failed: {type(exc).__name__}: {exc}",
                        transfer_id=exp.transfer_id,
                        source=sender,
                        destination=self.label,
                        transport=transport,
                    ),
                )
        finally:
            if staging is not None:
                self._free_staging(staging)
                del staging
            with self._cond:
                self._conns.discard(conn)
                if exp is not None:
                    exp.conns.discard(conn)
                    exp.reserved.difference_update(layers)
            conn.close()
        if outcome is not None:
            target, result = outcome
            if isinstance(result, TransferStats):
                self._finish(target, result)
            else:
                self._fail(target, result)

    def _claim(self, header: dict[str, Any], conn: socket.socket) -> tuple[_Expected, list[int]]:
        """The expectation this header is for, with its layers reserved for this connection."""
        if header.get("version") != PROTOCOL_VERSION:
            raise _Refusal(
                "protocol",
                f"protocol version {header.get('version')} (receiver speaks {PROTOCOL_VERSION})",
                False,
            )
        tid = str(header["transfer_id"])
        deadline = time.monotonic() + self.arrival_wait_s
        with self._cond:
            while tid not in self._pending and not self._closed and tid not in self._cancelled:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            if tid in self._cancelled and tid not in self._pending:
                raise _Refusal("cancelled", f"cancelled by the receiver: {self._cancelled[tid]}", False)
            exp = self._pending.get(tid)
            if exp is None:
                raise _Refusal(
                    "unknown",
                    f"the receiver expects no transfer with this id (waited {self.arrival_wait_s} s for it)",
                    False,
                )
            exp.sender = str(header.get("sender", "?"))
            theirs = KVLayout.from_dict(header["layout"])
            problems = theirs.differences(exp.layout)
            if int(header["num_blocks"]) != len(exp.block_ids):
                problems.append(f"blocks {header['num_blocks']} (sender) != {len(exp.block_ids)} (receiver)")
            if int(header["num_tokens"]) != exp.num_tokens:
                problems.append(f"num_tokens {header['num_tokens']} (sender) != {exp.num_tokens} (receiver)")
            if problems:
                raise _Refusal("layout", "KV layouts differ: " + "; ".join(problems), True, exp)
            layers = [int(i) for i in header["layers"]]
            clash = [i for i in layers if i not in exp.remaining or i in exp.reserved]
            if clash:
                raise _Refusal("layers", f"layers {clash} were already sent or are being sent", True, exp)
            exp.reserved.update(layers)
            exp.conns.add(conn)
            if exp.started is None:
                exp.started = time.monotonic()
        return exp, layers

    def _layers_done(self, exp: _Expected, layers: list[int], nbytes: int) -> TransferStats | None:
        """Records `layers` as written; the transfer's stats when that completes it."""
        with self._cond:
            if self._pending.get(exp.transfer_id) is not exp:  # cancelled while we were writing
                reason = self._cancelled.get(exp.transfer_id, "failed meanwhile")
                raise _Refusal("cancelled", f"cancelled by the receiver: {reason}", False)
            exp.reserved.difference_update(layers)
            exp.remaining.difference_update(layers)
            exp.bytes += nbytes
            self._counts["bytes_received"] += nbytes
            if exp.remaining:
                return None
        return _stats(
            exp.transport,
            transfer_id=exp.transfer_id,
            peer=exp.sender,
            bytes=exp.bytes,
            blocks=len(exp.block_ids),
            layers=exp.layout.num_layers,
            tokens=exp.num_tokens,
            seconds=time.monotonic() - (exp.started or time.monotonic()),
        )

    def _accept_device(self, header: dict[str, Any], exp: _Expected, sender: str) -> dict[str, Any] | None:
        """The device transport's answer to the header's offer; None (TCP) without either."""
        offer = header.get("device")
        if self._device is None or not isinstance(offer, dict):
            return None
        return self._device.accept(offer, exp.kv_caches, sender)

    # ------------------------------------------------------------------ sending side

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
        layout = KVLayout.of(kv_caches)
        ids, chosen = check_transfer_args(layout, kv_caches[0][0].shape[0], block_ids, num_tokens, layers)
        host, port = parse_address(peer)
        timeout = self.send_timeout_s if timeout_s is None else timeout_s
        used = self.transport  # becomes the device transport's name once the receiver takes it up

        def error(cls: type[KVTransferError], reason: str) -> KVTransferError:
            return cls(reason, transfer_id=transfer_id, source=self.label, destination=peer, transport=used)

        start = time.monotonic()
        sent = 0
        total = 2 * len(chosen) * num_tokens * layout.token_bytes
        staging: torch.Tensor | None = None
        sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
        with self._cond:
            if self._closed:
                sock.close()
                raise error(KVTransferError, "engine is closed")
            self._sends.setdefault(transfer_id, set()).add(sock)
        try:
            sock.settimeout(min(self.connect_timeout_s, timeout))
            try:
                sock.connect((host, port))
            except OSError as exc:
                raise error(KVTransferError, f"cannot connect: {exc}") from exc
            self._raise_if_cancelled(transfer_id, error, sent, total)  # cancel() raced the connect
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(timeout)
            header = {
                "version": PROTOCOL_VERSION,
                "transfer_id": transfer_id,
                "sender": self.label,
                "layout": layout.as_dict(),
                "num_blocks": len(ids),
                "num_tokens": num_tokens,
                "layers": chosen,
            }
            offer = self._device.offer(kv_caches, peer) if self._device is not None else None
            if offer is not None:
                header["device"] = offer
            _write_frame(sock, header, MAGIC)
            reply = _read_frame(sock)
            self._check_reply(reply, error)
            answer = reply.get("device") if offer is not None else None
            with torch.inference_mode():
                if isinstance(answer, dict) and offer is not None and self._device is not None:
                    used = self._device.name
                    sent = self._device.send_payload(
                        sock,
                        peer,
                        offer,
                        answer,
                        kv_caches,
                        ids,
                        num_tokens,
                        chosen,
                        start + timeout,
                        lambda done: self._raise_if_cancelled(transfer_id, error, done, total),
                    )
                    layers_to_stream: list[int] = []
                else:
                    layers_to_stream = chosen
                for layer in layers_to_stream:
                    self._raise_if_cancelled(transfer_id, error, sent, total)
                    if time.monotonic() - start > timeout:
                        raise error(
                            KVTransferTimeout, f"not sent within {timeout} s ({sent} of {total} bytes)"
                        )
                    for cache in kv_caches[layer]:
                        if self._direct(cache):
                            for view in _token_views(cache, ids, num_tokens):
                                sock.sendall(_byte_view(view))
                                sent += view.numel() * view.element_size()
                        else:
                            if staging is None:
                                staging = self._alloc_staging(layout, num_tokens, cache.device)
                            _gather(cache, ids, staging)
                            sock.sendall(_byte_view(staging))
                            sent += staging.numel() * staging.element_size()
            self._check_reply(_read_frame(sock), error)
        except KVTransferError:
            self._count_failure()
            raise
        except DeviceTransportError as exc:
            self._count_failure()
            raise error(KVTransferError, str(exc)) from exc
        except (OSError, ValueError, _Eof) as exc:
            self._count_failure()
            with self._cond:
                cancelled = transfer_id in self._cancelled_sends
            if cancelled:
                raise error(
                    KVTransferCancelled, f"cancelled by the sender after {sent} of {total} bytes"
                ) from exc
            if isinstance(exc, TimeoutError):
                raise error(
                    KVTransferTimeout, f"no progress for {timeout} s after {sent} of {total} bytes"
                ) from exc
            raise error(KVTransferError, f"connection broke after {sent} of {total} bytes: {exc}") from exc
        finally:
            if staging is not None:
                self._free_staging(staging)
                del staging
            with self._cond:
                socks = self._sends.get(transfer_id)
                if socks is not None:
                    socks.discard(sock)
                    if not socks:
                        del self._sends[transfer_id]
                        self._cancelled_sends.discard(transfer_id)
            sock.close()
        with self._cond:
            self._counts["sends_ok"] += 1
            self._counts["bytes_sent"] += sent
        return _stats(
            used,
            transfer_id=transfer_id,
            peer=peer,
            bytes=sent,
            blocks=len(ids),
            layers=len(chosen),
            tokens=num_tokens,
            seconds=time.monotonic() - start,
        )

    def _raise_if_cancelled(
        self,
        transfer_id: str,
        error: Callable[[type[KVTransferError], str], KVTransferError],
        sent: int,
        total: int,
    ) -> None:
        with self._cond:
            cancelled = transfer_id in self._cancelled_sends
        if cancelled:
            raise error(KVTransferCancelled, f"cancelled by the sender after {sent} of {total} bytes")

    @staticmethod
    def _check_reply(
        reply: dict[str, Any], error: Callable[[type[KVTransferError], str], KVTransferError]
    ) -> None:
        if reply.get("ok"):
            return
        kind, reason = reply.get("kind"), f"refused by the receiver: {reply.get('error', '?')}"
        cls = {"layout": KVLayoutMismatchError, "cancelled": KVTransferCancelled}.get(
            str(kind), KVTransferError
        )
        raise error(cls, reason)

    def _count_failure(self) -> None:
        with self._cond:
            self._counts["failures"] += 1

    # ------------------------------------------------------------------ staging, device sync

    def _alloc_staging(self, layout: KVLayout, num_tokens: int, device: torch.device) -> torch.Tensor:
        shape = (num_tokens, layout.num_kv_heads, layout.head_dim)
        pin = self.pin_memory and device.type != "cpu"
        buf = torch.empty(shape, dtype=layout.torch_dtype, pin_memory=pin)
        with self._cond:
            self._staging_bytes += buf.numel() * buf.element_size()
        return buf

    def _free_staging(self, buf: torch.Tensor) -> None:
        with self._cond:
            self._staging_bytes -= buf.numel() * buf.element_size()

    def _direct(self, cache: torch.Tensor) -> bool:
        """Whether the socket can read and write the cache's memory itself."""
        return self.zero_copy and cache.device.type == "cpu" and cache.is_contiguous()

    def _sync(self, device: torch.device) -> None:
        if device.type == "cpu":
            return
        if self._synchronize is not None:
            self._synchronize(device)
            return
        module = getattr(torch, device.type, None)
        if module is not None and hasattr(module, "synchronize"):
            module.synchronize(device)


# ---------------------------------------------------------------------------------- helpers


def _stats(transport: str, **fields: Any) -> TransferStats:
    """Plain `TransferStats` for TCP (what callers always got), `DeviceTransferStats` otherwise."""
    if transport == TcpKVTransferEngine.transport:
        return TransferStats(**fields)
    return DeviceTransferStats(**fields, transport=transport)


def _error_for(
    kind: str, reason: str, transfer_id: str, source: str, destination: str, transport: str
) -> KVTransferError:
    cls = {"layout": KVLayoutMismatchError, "cancelled": KVTransferCancelled}.get(kind, KVTransferError)
    return cls(reason, transfer_id=transfer_id, source=source, destination=destination, transport=transport)


def _gather(cache: torch.Tensor, ids: list[int], out: torch.Tensor) -> None:
    """The first out.shape[0] token rows of blocks `ids` of a device cache, into host `out`."""
    index = torch.tensor(ids, dtype=torch.long, device=cache.device)
    rows = cache.index_select(0, index).reshape(-1, *cache.shape[2:])[: out.shape[0]]
    out.copy_(rows)  # device -> host: returns once the bytes are on the host


def _scatter(cache: torch.Tensor, ids: list[int], rows: torch.Tensor) -> None:
    """Host token rows into blocks `ids` of a cache: whole blocks at once, then the partial one
    (whose rows past the transfer's tokens stay untouched)."""
    block_size = cache.shape[1]
    full, rem = divmod(rows.shape[0], block_size)
    src = rows.to(cache.device)
    if full:
        index = torch.tensor(ids[:full], dtype=torch.long, device=cache.device)
        cache.index_copy_(0, index, src[: full * block_size].reshape(full, block_size, *cache.shape[2:]))
    if rem:
        cache[ids[full], :rem].copy_(src[full * block_size :])


def _shutdown(s: socket.socket) -> None:
    """Wakes whoever is blocked on `s` (its owner closes it)."""
    try:
        s.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    _recv_into(sock, memoryview(buf))
    return bytes(buf)


def _recv_into(sock: socket.socket, view: memoryview) -> int:
    got, n = 0, len(view)
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise _Eof(f"peer closed the connection after {got} of {n} bytes")
        got += k
    return n


def _read_frame(sock: socket.socket) -> dict[str, Any]:
    (n,) = _LEN.unpack(_read_exact(sock, _LEN.size))
    if n > _MAX_FRAME:
        raise ValueError(f"frame of {n} bytes: the peer does not speak the kv transfer protocol")
    obj = json.loads(_read_exact(sock, n))
    if not isinstance(obj, dict):
        raise ValueError("malformed kv transfer frame")
    return obj


def _write_frame(sock: socket.socket, obj: dict[str, Any], prefix: bytes = b"") -> None:
    data = json.dumps(obj).encode()
    sock.sendall(prefix + _LEN.pack(len(data)) + data)


__all__ = [
    "MAGIC",
    "PROTOCOL_VERSION",
    "DeviceTransferStats",
    "DeviceTransport",
    "DeviceTransportError",
    "TcpKVTransferEngine",
    "parse_address",
]
