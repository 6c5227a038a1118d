"""`LLM(..., backend="jax")` generates the CPU backend's greedy text on tiny checkpoints.

Float32, EOS ignored, prompts that cross KV-block borders, a step budget small enough that
prefills are chunked beside other sequences' decodes, and decode steps through the graph runner.
"""

from __future__ import annotations

import pytest
from xllm import LLM, SamplingParams

BLOCK_SIZE = 16
MAX_TOKENS = 10
PROMPTS = [
    "Hello there, tiny model",
    "The quick brown fox jumps over the lazy dog and keeps running past the seventeenth token",
    "a b c d e f g h i j k l m n o p q r s t",
]


def generate(path, backend: str) -> list[tuple[list[int], str]]:
    llm = LLM(
        model=str(path),
        backend=backend,
        dtype="float32",
        block_size=BLOCK_SIZE,
        max_model_len=128,
        kv_cache_memory=4 * 1024 * 1024,
        max_num_seqs=4,
        max_num_batched_tokens=32,
    )
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    outputs = llm.generate(PROMPTS, params, use_tqdm=False)
    return [(list(o.outputs[0].token_ids), o.outputs[0].text) for o in outputs]


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_text_matches_cpu(family, tiny_model_dir):
    path = tiny_model_dir(family)
    got = generate(path, "jax")
    want = generate(path, "cpu")
    for (tokens, text), (ref_tokens, ref_text) in zip(got, want, strict=True):
        assert tokens == ref_tokens
        assert text == ref_text
    assert all(len(tokens) == MAX_TOKENS for tokens, _ in got)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_greedy_text_matches_cpu_other_families(family, tiny_model_dir):
    path = tiny_model_dir(family)
    assert generate(path, "jax") == generate(path, "cpu")


def test_seeded_sampling_draws_the_cpu_tokens(tiny_model_dir):
    # Same seeds, same host uniforms (the HAL's row_uniforms), same float32 probabilities: the
    # same tokens, with penalties, top-k and top-p on.
    path = tiny_model_dir("llama")
    params = SamplingParams(
        temperature=0.9, top_p=0.95, top_k=50, repetition_penalty=1.1, seed=7, max_tokens=8, ignore_eos=True
    )
    tokens = {}
    for backend in ("jax", "cpu"):
        llm = LLM(
            model=str(path), backend=backend, dtype="float32", max_model_len=128, kv_cache_memory=4 << 20
        )
        tokens[backend] = [
            list(o.outputs[0].token_ids) for o in llm.generate(PROMPTS, params, use_tqdm=False)
        ]
    assert tokens["jax"] == tokens["cpu"]
