"""`Scheduler`: picks the sequences and token counts of the next step (continuous batching).

Each step fills a budget of ``max_num_batched_tokens`` tokens and ``max_num_seqs`` sequences:
running decodes first (one token each), then running prefills that are mid-way through their
prompt (chunked prefill), then waiting sequences in priority order. When the KV cache runs out of
blocks, the running sequence of lowest priority and latest arrival is preempted: its blocks are
freed and it goes back to the waiting queue to be recomputed (vLLM's recompute preemption).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

from xllm.engine.kv_cache_manager import KVCacheManager
from xllm.engine.sequence import Sequence, SequenceStatus


@dataclass(slots=True)
class ScheduledSequence:
    seq: Sequence
    num_new_tokens: int

    @property
    def completes_context(self) -> bool:
        """True when this step computes the sequence's last token, so it samples a new one."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass(slots=True)
class SchedulerOutput:
    scheduled: list[ScheduledSequence] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled


def _queue_key(seq: Sequence) -> tuple[int, float, int]:
    return (seq.priority, seq.arrival_time, seq.seq_id)


class Scheduler:
    def __init__(
        self,
        kv_cache: KVCacheManager,
        max_num_seqs: int,
        max_num_batched_tokens: int,
        enable_chunked_prefill: bool = True,
    ) -> None:
        self.kv_cache = kv_cache
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.enable_chunked_prefill = enable_chunked_prefill
        self.waiting: list[Sequence] = []  # sorted by (priority, arrival): front runs first
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_running(self) -> int:
        return len(self.running)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def add(self, seq: Sequence) -> None:
        assert not seq.block_table, "waiting sequences hold no blocks"
        seq.status = SequenceStatus.WAITING
        keys = [_queue_key(s) for s in self.waiting]
        self.waiting.insert(bisect.bisect(keys, _queue_key(seq)), seq)

    def add_running(self, seq: Sequence) -> None:
        """Admits a sequence that already holds blocks (a forked sibling of an n > 1 request)."""
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)

    def remove(self, seq: Sequence) -> None:
        """Takes a sequence out of the queues and frees its blocks (finish or abort)."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.kv_cache.free(seq)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.max_num_batched_tokens
        scheduled_ids: set[int] = set()
        seats_freed = self._free_seats_for_better_class(out)

        # Running sequences by priority class (online work takes the token budget before offline
        # work), then decodes (one token) before unfinished prefills.
        for seq in sorted(
            self.running,
            key=lambda s: (s.priority, s.num_tokens - s.num_computed_tokens > 1, _queue_key(s)),
        ):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            num_new = min(seq.num_tokens - seq.num_computed_tokens, budget)
            while not self.kv_cache.allocate(seq, num_new):
                victim = self._pick_victim(exclude=scheduled_ids)
                self._preempt(victim, out)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                continue
            out.scheduled.append(ScheduledSequence(seq, num_new))
            scheduled_ids.add(seq.seq_id)
            budget -= num_new

        # New work only when nothing was evicted for blocks: admitting it would just evict again.
        evicted = len(out.preempted) > seats_freed
        while self.waiting and budget > 0 and not evicted and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if seq.num_pending:  # preempted with a token still being sampled: its prompt is not known yet
                break
            if not seq.block_table:
                self.kv_cache.match_prefix(seq)
            remaining = seq.num_tokens - seq.num_computed_tokens
            if remaining > budget and not self.enable_chunked_prefill:
                break
            num_new = min(remaining, budget)
            if not self.kv_cache.allocate(seq, num_new):
                # Waiting sequences hold no blocks (else they could starve the running ones);
                # the prefix match is redone next time, cheaply.
                self.kv_cache.free(seq)
                break
            self.waiting.pop(0)
            self.kv_cache.record_prefix_hit(seq)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.scheduled.append(ScheduledSequence(seq, num_new))
            budget -= num_new
        return out

    def _free_seats_for_better_class(self, out: SchedulerOutput) -> int:
        """With every seat taken, a waiting request of a better class than a running one (online
        behind offline work) takes that one's seat at once; the evicted one is recomputed later.
        Returns how many were evicted."""
        freed = 0
        queued = iter(list(self.waiting))
        while len(self.running) >= self.max_num_seqs and self.running:
            seq = next(queued, None)
            victim = max(self.running, key=_queue_key)
            if seq is None or victim.priority <= seq.priority:
                break
            self._preempt(victim, out)
            freed += 1
        return freed

    def _pick_victim(self, exclude: set[int]) -> Sequence:
        """The running sequence of lowest priority, then latest arrival; already-scheduled
        sequences of this step are preempted only when nothing else is left."""
        candidates = [s for s in self.running if s.seq_id not in exclude] or self.running
        return max(candidates, key=_queue_key)

    def _preempt(self, seq: Sequence, out: SchedulerOutput) -> None:
        self.running.remove(seq)
        self.kv_cache.free(seq)
        for i, item in enumerate(out.scheduled):
            if item.seq is seq:
                del out.scheduled[i]
                break
        self.add(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1
