"""The engine on the CUDA backend (kernels interpreted): a tiny real checkpoint decodes greedily to
the same tokens as on the CPU reference, through prefill, decode and the graph-runner path."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("family", ["qwen3"])
def test_greedy_generation_matches_cpu(backend, tiny_model_dir, family):
    from xllm import LLM, SamplingParams

    path = str(tiny_model_dir(family))
    prompts = ["Hello there, how are", "The capital of France is a city that"]
    params = SamplingParams(temperature=0.0, max_tokens=10)
    tokens = {}
    for name, options in (("cpu", {}), ("cuda", {"interpret": True})):
        llm = LLM(
            model=path,
            backend=name,
            backend_options=options,
            dtype="float32",
            kv_cache_memory=1 << 22,
            max_num_seqs=4,
        )
        tokens[name] = [r.outputs[0].token_ids for r in llm.generate(prompts, params, use_tqdm=False)]
    assert all(len(t) == 10 for t in tokens["cuda"])
    assert tokens["cuda"] == tokens["cpu"]
