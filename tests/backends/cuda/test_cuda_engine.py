"""The engine on the CUDA backend (kernels interpreted): a tiny real checkpoint decodes to the
same tokens as on the CPU reference, greedily and with seeded sampling, through prefill, decode
and the graph-runner path."""

from __future__ import annotations

import pytest

PROMPTS = ["Hello there, how are", "The capital of France is a city that"]


def generate_on_cpu_and_cuda(path: str, params) -> dict[str, list[list[int]]]:
    from xllm import LLM

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
        tokens[name] = [r.outputs[0].token_ids for r in llm.generate(PROMPTS, params, use_tqdm=False)]
    return tokens


@pytest.mark.parametrize("family", ["qwen3"])
def test_greedy_generation_matches_cpu(backend, tiny_model_dir, family):
    from xllm import SamplingParams

    params = SamplingParams(temperature=0.0, max_tokens=10)
    tokens = generate_on_cpu_and_cuda(str(tiny_model_dir(family)), params)
    assert all(len(t) == 10 for t in tokens["cuda"])
    assert tokens["cuda"] == tokens["cpu"]


def test_seeded_sampling_matches_cpu(backend, tiny_model_dir):
    """One random stream on every backend: a seeded request samples the CPU reference's tokens."""
    from xllm import SamplingParams

    params = [
        SamplingParams(temperature=1.0, seed=7, max_tokens=10, ignore_eos=True),
        SamplingParams(temperature=0.8, top_p=0.9, top_k=40, seed=1234, max_tokens=10, ignore_eos=True),
    ]
    tokens = generate_on_cpu_and_cuda(str(tiny_model_dir("qwen3")), params)
    assert all(len(t) == 10 for t in tokens["cuda"])
    assert tokens["cuda"] == tokens["cpu"]
