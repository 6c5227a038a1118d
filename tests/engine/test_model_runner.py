"""The model runner's attention metadata: host copies of the lengths, and the graph rule."""

from __future__ import annotations

import pytest

from xllm import SamplingParams


def _record_metadata(llm, monkeypatch) -> list[dict]:
    """Every forward pass's metadata, as tensor values and host copies at the time of the call."""
    model, seen = llm.engine.runner.model, []
    forward = model.forward

    def recording(input_ids, positions, kv_caches, metadata):
        seen.append(
            {
                "qsl": metadata.query_start_loc.tolist(),
                "seq_lens": metadata.seq_lens.tolist(),
                "qsl_host": None
                if metadata.query_start_loc_host is None
                else list(metadata.query_start_loc_host),
                "seq_lens_host": None if metadata.seq_lens_host is None else list(metadata.seq_lens_host),
            }
        )
        return forward(input_ids, positions, kv_caches, metadata)

    monkeypatch.setattr(model, "forward", recording)
    return seen


@pytest.mark.parametrize("use_graphs", [False, True])
def test_metadata_carries_host_copies_equal_to_the_tensors(make_llm, monkeypatch, use_graphs):
    llm = make_llm(use_graphs=use_graphs, max_num_seqs=4)
    seen = _record_metadata(llm, monkeypatch)
    params = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm.generate([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14]], params, use_tqdm=False)
    eager = [m for m in seen if m["seq_lens_host"] is not None]
    replayed = [m for m in seen if m["seq_lens_host"] is None]
    assert eager, "the prefill step runs eagerly"
    for m in eager:  # built from the runner's own lists: equal to the tensors, value by value
        assert m["qsl_host"] == m["qsl"] and m["seq_lens_host"] == m["seq_lens"]
    if use_graphs:
        # Decode steps go through the graph runner, where only per-bucket host values may be
        # given: the query layout [0, 1, ..., B] yes, the lengths (new at every replay) no.
        assert replayed
        for m in replayed:
            assert m["qsl_host"] == m["qsl"] == list(range(len(m["seq_lens"]) + 1))
    else:
        assert not replayed and len(eager) == 4  # one prefill step, then three decode steps
