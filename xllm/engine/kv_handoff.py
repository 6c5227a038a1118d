"""Prefill/decode hand-off in the engine: holding a prompt's KV for a decode instance, and
receiving one from a prefill instance, over the HAL's `KVTransferEngine`.

Prefill side. A request added with ``kv_hold`` runs as usual (the router asks for one token);
when it ends by length, its prompt blocks are not returned to the pool but *held* under the
request id for `hold_timeout_s`: the response tells the router the transfer id and the number of
prompt tokens, and the decode instance asks for them (`send_held`, from any thread) with the
address and the first block it still needs. A hold ends when its send ends, or when it expires
(a decode side that never asked, a client that went away), so nothing stays allocated for long.

Decode side. A request added with a `KVSource` (the prefill instance, as the service reaches it)
and the prefill's first token as its resumed output skips its prefill: the engine adopts what its
own prefix cache holds, allocates the rest, `expect`s the missing blocks and asks the source to
send them. The sequence waits outside the scheduler until they arrive; then it runs as if it had
computed its prompt here. A transfer that fails (cannot connect, layout mismatch, the hold
expired, timeout) is logged with both instances and the transport named, counted, and the
request is prefilled locally instead: slower, never wrong. An abort cancels the transfer first.

Everything that touches the KV-cache manager or the scheduler runs on the engine thread; the
transfer engine's threads and `send_held`'s caller only read held blocks, which no one writes.
"""

from __future__ import annotations

import concurrent.futures
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from xllm.engine.kv_cache_manager import KVCacheManager
from xllm.engine.sequence import Sequence
from xllm.hal import Backend
from xllm.hal.kv_transfer import KVCaches, KVTransferEngine, KVTransferError, TransferStats

logger = logging.getLogger("xllm.engine.kv_handoff")

DEFAULT_HOLD_TIMEOUT_S = 4.0  # a client that leaves mid-transfer frees the prefill side within 5 s
DEFAULT_RECEIVE_TIMEOUT_S = 30.0


@runtime_checkable
class KVSource(Protocol):
    """Where a decode request's prompt KV is held (a prefill instance, as the service reaches it)."""

    transfer_id: str  # the name the holder keeps the KV under

    def request_send(self, destination: str, first_block: int, num_tokens: int) -> None:
        """Asks the holder to send `num_tokens` tokens of the held KV, from block `first_block`
        on, to the transfer engine at `destination`; raises when it refuses or cannot be reached."""

    def describe(self) -> str:
        """The source as a log line names it (its URL)."""


@dataclass(slots=True)
class HeldKV:
    transfer_id: str
    block_ids: list[int]
    num_tokens: int
    deadline: float
    sending: bool = False


@dataclass(slots=True)
class Receiving:
    seq: Sequence
    transfer_id: str
    source: KVSource
    future: concurrent.futures.Future
    started: float
    blocks: int
    tokens: int


# Receive latency (from `expect` to the last block written) histogram bounds, in seconds.
LATENCY_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass(slots=True)
class HandoffStats:
    """Counters for /metrics: what this instance sent and received, and what failed why."""

    sends: int = 0
    receives: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    blocks_sent: int = 0
    blocks_received: int = 0
    failures: Counter = field(default_factory=Counter)  # reason -> count
    holds_expired: int = 0
    # Cumulative histogram of receive latencies: counts per LATENCY_BUCKETS_S bound (+Inf last).
    latency_buckets: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS_S) + 1))
    latency_sum_s: float = 0.0
    held: int = 0  # gauges, filled in by `snapshot`
    receiving: int = 0

    def observe_latency(self, seconds: float) -> None:
        self.latency_sum_s += seconds
        for i, bound in enumerate(LATENCY_BUCKETS_S):
            if seconds <= bound:
                self.latency_buckets[i] += 1
        self.latency_buckets[-1] += 1


class KVHandoff:
    def __init__(
        self,
        backend: Backend,
        kv_cache: KVCacheManager,
        kv_caches: Callable[[], KVCaches],
        host: str = "127.0.0.1",
        hold_timeout_s: float = DEFAULT_HOLD_TIMEOUT_S,
        receive_timeout_s: float = DEFAULT_RECEIVE_TIMEOUT_S,
    ) -> None:
        self.backend = backend
        self.kv_cache = kv_cache
        self._kv_caches = kv_caches
        self.host = host
        self.hold_timeout_s = hold_timeout_s
        self.receive_timeout_s = receive_timeout_s
        self._transfer: KVTransferEngine | None = None
        self._lock = threading.Lock()
        self.held: dict[str, HeldKV] = {}
        self._finished_sends: list[str] = []  # holds whose send ended, to release on the engine thread
        self.receiving: dict[str, Receiving] = {}  # by request id
        self.stats = HandoffStats()
        self._pool: concurrent.futures.ThreadPoolExecutor | None = None

    # ---- the transfer engine -------------------------------------------------------------

    @property
    def transfer(self) -> KVTransferEngine:
        with self._lock:
            if self._transfer is None:
                self._transfer = self.backend.create_kv_transfer(host=self.host)
                logger.info("kv transfer engine listening at %s", self._transfer.address)
            return self._transfer

    @property
    def address(self) -> str:
        return self.transfer.address

    def snapshot(self) -> HandoffStats:
        """A copy of the counters with the current holds and receives (any thread)."""
        with self._lock:
            s = self.stats
            return HandoffStats(
                s.sends,
                s.receives,
                s.bytes_sent,
                s.bytes_received,
                s.blocks_sent,
                s.blocks_received,
                Counter(s.failures),
                s.holds_expired,
                list(s.latency_buckets),
                s.latency_sum_s,
                held=len(self.held),
                receiving=len(self.receiving),
            )

    def has_work(self) -> bool:
        return bool(self.held or self.receiving)

    def close(self) -> None:
        for rec in list(self.receiving.values()):
            self.cancel(rec.seq)
        with self._lock:
            transfer, self._transfer = self._transfer, None
            pool, self._pool = self._pool, None
        if transfer is not None:
            transfer.close()
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)

    # ---- prefill side ----------------------------------------------------------------------

    def hold(self, seq: Sequence) -> dict[str, object]:
        """Keeps `seq`'s prompt blocks past its end (called before its blocks are freed);
        returns what the decode side needs to ask for them."""
        n = seq.num_prompt_tokens
        block_ids = list(seq.block_table[: self.kv_cache.blocks_needed(n)])
        for block_id in block_ids:
            self.kv_cache.hold_block(block_id)
        tid = seq.request.request_id
        with self._lock:
            self.held[tid] = HeldKV(tid, block_ids, n, time.monotonic() + self.hold_timeout_s)
        return {
            "transfer_id": tid,
            "num_tokens": n,
            "num_blocks": len(block_ids),
            "block_size": self.kv_cache.block_size,
        }

    def send_held(
        self, transfer_id: str, destination: str, first_block: int, num_tokens: int
    ) -> TransferStats:
        """Sends held KV to `destination` (any thread); the hold ends with the send."""
        with self._lock:
            held = self.held.get(transfer_id)
            if held is None or held.sending:
                raise KeyError(f"no KV held under {transfer_id!r} (expired, already sent, or never held)")
            held.sending = True
        try:
            bs = self.kv_cache.block_size
            if not 0 <= first_block < len(held.block_ids) or num_tokens != held.num_tokens - first_block * bs:
                raise ValueError(
                    f"asked for {num_tokens} tokens from block {first_block}; {transfer_id!r} holds "
                    f"{held.num_tokens} tokens in {len(held.block_ids)} blocks of {bs}"
                )
            stats = self.transfer.send(
                destination, transfer_id, self._kv_caches(), held.block_ids[first_block:], num_tokens
            )
            # Counted before the hold ends: once the engine has let the blocks go, the send shows.
            self.stats.sends += 1
            self.stats.bytes_sent += stats.bytes
            self.stats.blocks_sent += stats.blocks
        except Exception as exc:
            self.stats.failures[_reason(exc)] += 1
            raise
        finally:
            with self._lock:
                self._finished_sends.append(transfer_id)
        return stats

    def release(self, transfer_id: str) -> bool:
        """Ends a hold (engine thread); False if there was none or it is being sent."""
        with self._lock:
            held = self.held.get(transfer_id)
            if held is None or held.sending:
                return False
            del self.held[transfer_id]
        self._free(held)
        return True

    def _free(self, held: HeldKV) -> None:
        for block_id in held.block_ids:
            self.kv_cache.release_block(block_id)

    # ---- decode side -----------------------------------------------------------------------

    def start_receive(self, seq: Sequence, source: KVSource) -> bool:
        """Allocates `seq`'s blocks and starts receiving the prompt KV it lacks (engine thread).
        True when `seq` now waits for a transfer or is ready (see `poll`); False when it must be
        prefilled locally (not enough free blocks)."""
        self.kv_cache.match_prefix(seq)
        n = seq.num_prompt_tokens
        computed = seq.num_computed_tokens
        if not self.kv_cache.allocate(seq, seq.num_tokens - computed):
            self.kv_cache.free(seq)
            self.stats.failures["no_free_blocks"] += 1
            return False
        tid = source.transfer_id
        first_block = computed // self.kv_cache.block_size
        tokens = n - computed
        future: concurrent.futures.Future
        if tokens == 0:  # its own prefix cache had the whole prompt
            future = concurrent.futures.Future()
            future.set_result(None)
        else:
            dst = seq.block_table[first_block : self.kv_cache.blocks_needed(n)]
            future = self.transfer.expect(
                tid, self._kv_caches(), dst, tokens, timeout_s=self.receive_timeout_s
            )
            ask = self._executor().submit(source.request_send, self.transfer.address, first_block, tokens)
            ask.add_done_callback(lambda f: self._asked(f, tid, source))
        self.receiving[seq.request.request_id] = Receiving(
            seq, tid, source, future, time.monotonic(), len(seq.block_table), tokens
        )
        return True

    def _asked(self, ask: concurrent.futures.Future, tid: str, source: KVSource) -> None:
        exc = ask.exception()
        if exc is not None and self._transfer is not None:
            self._transfer.cancel(tid, reason=f"the prefill side {source.describe()} refused to send: {exc}")

    def poll(self) -> tuple[list[Sequence], list[tuple[Sequence, str]]]:
        """Transfers that ended since the last poll (engine thread): sequences whose prompt KV is
        in place, and (sequence, why) for those that must be prefilled locally. Also ends the
        holds whose send is over or whose time is up."""
        with self._lock:
            finished, self._finished_sends = self._finished_sends, []
            now = time.monotonic()
            expired = [h for h in self.held.values() if not h.sending and h.deadline < now]
            for h in expired:
                del self.held[h.transfer_id]
            done = [self.held.pop(tid) for tid in finished if tid in self.held]
        for h in done + expired:
            self._free(h)
        if expired:
            self.stats.holds_expired += len(expired)
            logger.info("released %d held KV transfers nobody asked for in time", len(expired))
        ready: list[Sequence] = []
        failed: list[tuple[Sequence, str]] = []
        for rid, rec in list(self.receiving.items()):
            if not rec.future.done():
                continue
            del self.receiving[rid]
            exc = rec.future.exception()
            if exc is None:
                stats = rec.future.result()
                if stats is not None:
                    self.stats.receives += 1
                    self.stats.bytes_received += stats.bytes
                    self.stats.blocks_received += stats.blocks
                    self.stats.observe_latency(time.monotonic() - rec.started)
                ready.append(rec.seq)
            else:
                self.stats.failures[_reason(exc)] += 1
                why = str(exc) if isinstance(exc, KVTransferError) else f"{type(exc).__name__}: {exc}"
                failed.append((rec.seq, why))
        return ready, failed

    def wait(self, timeout_s: float) -> None:
        """Blocks up to `timeout_s` for a receive to end (the engine has nothing else to run)."""
        futures = [rec.future for rec in self.receiving.values()]
        if futures:
            concurrent.futures.wait(
                futures, timeout=timeout_s, return_when=concurrent.futures.FIRST_COMPLETED
            )
        else:
            time.sleep(timeout_s)

    def cancel(self, seq: Sequence) -> bool:
        """Stops receiving for `seq` (an abort); its blocks are the caller's to free. True if it
        was receiving."""
        rec = self.receiving.pop(seq.request.request_id, None)
        if rec is None:
            return False
        if not rec.future.done() and self._transfer is not None:
            self._transfer.cancel(rec.transfer_id, reason="the request was aborted")
            try:  # the blocks belong to the transfer until its future resolves
                rec.future.exception(timeout=5.0)
            except concurrent.futures.TimeoutError:
                logger.error("kv transfer %s did not stop after cancel", rec.transfer_id)
        return True

    def _executor(self) -> concurrent.futures.ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = concurrent.futures.ThreadPoolExecutor(
                    max_workers=4, thread_name_prefix="xllm-kv-ask"
                )
            return self._pool


def _reason(exc: BaseException) -> str:
    """A short label for a failure (a metrics label value)."""
    name = type(exc).__name__
    return {
        "KVLayoutMismatchError": "layout_mismatch",
        "KVTransferCancelled": "cancelled",
        "KVTransferTimeout": "timeout",
        "KVTransferError": "transfer_error",
        "KeyError": "not_held",
        "ValueError": "bad_request",
    }.get(name, "other")
