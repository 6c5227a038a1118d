"""Scheduler: token budget, chunked prefill, decode-first order, preemption and priorities."""

from __future__ import annotations

from xllm.engine.kv_cache_manager import KVCacheManager
from xllm.engine.outputs import RequestMetrics
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.scheduler import Scheduler
from xllm.engine.sequence import Request, Sequence, SequenceStatus


def make_seq(seq_id: int, n_tokens: int, priority: int = 0, arrival: float | None = None) -> Sequence:
    req = Request(
        str(seq_id),
        None,
        [1] * n_tokens,
        SamplingParams(),
        priority,
        RequestMetrics(float(seq_id) if arrival is None else arrival),
    )
    seq = Sequence(seq_id, req, 0, [1] * n_tokens, n_tokens, seed=0)
    req.seqs.append(seq)
    return seq


def run_step(sched: Scheduler):
    out = sched.schedule()
    for item in out.scheduled:  # pretend the model ran and sampled where a sequence completed
        item.seq.num_computed_tokens += item.num_new_tokens
        if item.seq.num_computed_tokens == item.seq.num_tokens:
            item.seq.token_ids.append(2)
    return out


def test_chunked_prefill_respects_budget_and_decodes_go_first():
    kv = KVCacheManager(64, 4, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=10)
    a, b = make_seq(0, 6), make_seq(1, 15)
    sched.add(a)
    sched.add(b)
    out = run_step(sched)
    assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled] == [(0, 6), (1, 4)]
    out = run_step(sched)
    # a decodes first (1 token), then b continues its prompt with the rest of the budget.
    assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled] == [(0, 1), (1, 9)]
    out = run_step(sched)
    assert [(i.seq.seq_id, i.num_new_tokens) for i in out.scheduled] == [(0, 1), (1, 2)]
    assert out.num_tokens <= 10


def test_preempts_latest_lowest_priority_when_blocks_run_out():
    kv = KVCacheManager(4, 2, enable_prefix_caching=False)
    sched = Scheduler(kv, max_num_seqs=8, max_num_batched_tokens=100)
    online_old = make_seq(0, 3, priority=0)
    offline = make_seq(1, 3, priority=1)
    sched.add(online_old)
    sched.add(offline)
    run_step(sched)  # both prefill: 2 blocks each, pool full
    assert kv.num_free_blocks == 0
    out = run_step(sched)  # token 3 still fits the second block
    assert not out.preempted
    out = run_step(sched)  # token 4 needs a third block each: only by preempting
    assert out.preempted == [offline]
    assert offline.status is SequenceStatus.WAITING and offline.block_table == []
    assert [i.seq for i in out.scheduled] == [online_old]


def test_waiting_queue_orders_by_priority_then_arrival():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(kv, max_num_seqs=1, max_num_batched_tokens=100)
    late_online = make_seq(0, 3, priority=0, arrival=5.0)
    early_offline = make_seq(1, 3, priority=1, arrival=1.0)
    sched.add(early_offline)
    sched.add(late_online)
    out = sched.schedule()
    assert [i.seq for i in out.scheduled] == [late_online]


def test_max_num_seqs_limits_admission():
    kv = KVCacheManager(64, 4)
    sched = Scheduler(kv, max_num_seqs=2, max_num_batched_tokens=100)
    for i in range(3):
        sched.add(make_seq(i, 3))
    out = sched.schedule()
    assert len(out.scheduled) == 2 and sched.num_waiting == 1


def test_failed_admission_leaves_no_blocks_held():
    kv = KVCacheManager(2, 4)
    sched = Scheduler(kv, max_num_seqs=4, max_num_batched_tokens=100)
    a = make_seq(0, 8)
    sched.add(a)
    run_step(sched)
    b = make_seq(1, 5)
    sched.add(b)
    sched.schedule()
    assert b.block_table == [] and b.status is SequenceStatus.WAITING
