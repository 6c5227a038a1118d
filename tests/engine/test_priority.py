"""Priority: lower values run first, and preemption evicts the lowest-priority sequence."""

from __future__ import annotations

from xllm import SamplingParams


def test_lower_priority_value_runs_first(make_llm):
    llm = make_llm(max_num_seqs=1)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    outs = llm.generate([[10, 11], [20, 21], [30, 31]], params, use_tqdm=False, priority=[1, 1, 0])
    order = sorted(range(3), key=lambda i: outs[i].metrics.first_scheduled_time)
    assert order == [2, 0, 1]  # the priority-0 request first, then arrival order


def test_preemption_evicts_the_offline_request(make_llm):
    # 6 blocks of 16 tokens: two 40-token sequences cannot both grow to 60 tokens.
    llm = make_llm(kv_blocks=6)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    engine.add_request("offline", list(range(100, 140)), params, priority=1)
    engine.add_request("online", list(range(200, 240)), params, priority=0)
    preempted_first = None
    finished = []
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished.append(out.request_id)
        if preempted_first is None and engine.scheduler.num_preemptions:
            preempted_first = [s.request.request_id for s in engine.scheduler.waiting]
    assert preempted_first == ["offline"]
    assert finished == ["online", "offline"]


def test_online_request_takes_the_seat_of_an_offline_one(make_llm):
    # One seat: the offline request runs until an online one arrives, which takes its seat at once
    # (the offline one is recomputed later) instead of waiting for it to finish.
    llm = make_llm(max_num_seqs=1)
    engine = llm.engine
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    engine.add_request("offline", list(range(100, 120)), params, priority=1)
    for _ in range(3):
        engine.step()
    engine.add_request("online", list(range(200, 220)), params, priority=0)
    finished = []
    online_started_at_step = None
    step = 0
    while engine.has_unfinished_requests():
        outs = engine.step()
        step += 1
        running = [s.request.request_id for s in engine.scheduler.running]
        if online_started_at_step is None and "online" in running:
            online_started_at_step = step
        finished += [o.request_id for o in outs if o.finished]
    assert online_started_at_step == 1
    assert finished == ["online", "offline"]
    assert engine.scheduler.num_preemptions == 1


def test_offline_preemption_keeps_greedy_output(make_llm):
    llm = make_llm(max_num_seqs=1)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    alone = llm.generate([list(range(100, 120))], params, use_tqdm=False)[0].outputs[0].token_ids
    engine = llm.engine
    engine.add_request("offline", list(range(100, 120)), params, priority=1)
    for _ in range(4):
        engine.step()
    engine.add_request("online", list(range(200, 220)), params, priority=0)
    outputs = {}
    while engine.has_unfinished_requests():
        for o in engine.step():
            if o.finished:
                outputs[o.request_id] = o.outputs[0].token_ids
    assert outputs["offline"] == alone
