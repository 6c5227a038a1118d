"""llama.cpp on the exported float32 GGUF decodes greedily to the same tokens as xllm.

This is what makes the llama.cpp column of `xllm bench throughput --compare` a like-for-like
figure: same weights, same rope (the Q/K row permutation, Llama 3 frequency factors), same
output. Skipped only when llama-cpp-python is not installed (it builds llama.cpp from source,
so it is not in the `test` extra: ``pip install llama-cpp-python gguf``).
"""

from __future__ import annotations

import importlib.util
import random

import pytest

from xllm import LLM, SamplingParams

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("gguf") is None,
    reason="llama_cpp (pip install llama-cpp-python) or gguf is not importable",
)

NEW_TOKENS = 12


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_greedy_tokens_match_xllm(tiny_model_dir, tmp_path, family: str) -> None:
    from xllm.bench.gguf_export import ensure_gguf
    from xllm.bench.peers.llama_cpp_peer import generate, load

    model_dir = tiny_model_dir(family)
    cpp = load(str(ensure_gguf(model_dir, "float32", tmp_path)), n_ctx=128, n_threads=2)
    llm = LLM(model=str(model_dir), dtype="float32", kv_cache_memory="32MiB")
    rng = random.Random(1)
    # Prompt lengths on both sides of a KV block and past the tiny Llama's original rope context
    # (64), where the Llama 3 frequency factors decide the angles.
    prompts = [[rng.randrange(5, 512) for _ in range(n)] for n in (3, 17, 70)]
    params = SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True)
    ours = [list(r.outputs[0].token_ids) for r in llm.generate(prompts, params, use_tqdm=False)]
    theirs = [generate(cpp, p, NEW_TOKENS) for p in prompts]
    assert theirs == ours


def test_batched_path_decodes_like_xllm(tiny_llama_dir, tmp_path) -> None:
    """The multi-sequence path of batched workloads: one sequence gives exactly the tokens of
    `Llama.generate`; several give xllm's first tokens (later ones may drift: batched float32
    matmuls sum in another order)."""
    from xllm.bench.gguf_export import ensure_gguf
    from xllm.bench.peers.llama_cpp_peer import generate, generate_batched, load

    path = str(ensure_gguf(tiny_llama_dir, "float32", tmp_path))
    rng = random.Random(2)
    prompts = [[rng.randrange(5, 512) for _ in range(n)] for n in (9, 30, 21, 4)]
    lens = [8, 3, 8, 6]
    [(single, _)] = generate_batched(path, prompts[:1], lens[:1], n_threads=2)
    assert single == [generate(load(path, n_ctx=64, n_threads=2), prompts[0], lens[0])]

    llm = LLM(model=str(tiny_llama_dir), dtype="float32", kv_cache_memory="32MiB")
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in lens]
    ours = [list(r.outputs[0].token_ids) for r in llm.generate(prompts, params, use_tqdm=False)]
    [(theirs, _)] = generate_batched(path, prompts, lens, n_threads=2)
    assert [len(t) for t in theirs] == lens
    assert [t[:3] for t in theirs] == [o[:3] for o in ours]
