"""Every family's forward pass matches transformers' on the same checkpoint (float32, CPU backend).

A ~40-token prompt is prefilled in one step over a scrambled block table (so tokens cross block
borders into non-adjacent blocks), then a few tokens are decoded one at a time from the paged
cache. Logits must match Hugging Face's to 1e-4 and the greedy tokens must be identical.
"""

from __future__ import annotations

import pytest
import torch

from xllm.hal import get_backend
from xllm.hal.metadata import AttentionMetadata
from xllm.models import SUPPORTED_FAMILIES, load_model

BLOCK_SIZE = 16
PROMPT_LEN = 41
DECODE_STEPS = 6
# Deliberately out of order: a model that ignored the block table would read the wrong keys.
BLOCK_TABLE = [5, 2, 7, 0, 3, 6]


def prompt_ids(vocab_size: int) -> list[int]:
    gen = torch.Generator().manual_seed(1234)
    # Skip the special-token ids at the bottom of the vocabulary.
    return torch.randint(8, vocab_size, (PROMPT_LEN,), generator=gen).tolist()


def metadata(start: int, num_tokens: int, model, window: int | None = "model") -> AttentionMetadata:
    """One sequence whose tokens start..start+num_tokens-1 are the new (query) tokens."""
    seq_len = start + num_tokens
    slots = [BLOCK_TABLE[p // BLOCK_SIZE] * BLOCK_SIZE + p % BLOCK_SIZE for p in range(start, seq_len)]
    return AttentionMetadata(
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        seq_lens=torch.tensor([seq_len], dtype=torch.int32),
        block_tables=torch.tensor([BLOCK_TABLE], dtype=torch.int32),
        slot_mapping=torch.tensor(slots, dtype=torch.int64),
        max_query_len=num_tokens,
        max_seq_len=seq_len,
        scale=model.attention_scale,
        sliding_window=model.sliding_window if window == "model" else window,
    )


def run_greedy(
    model, backend, prompt: list[int], window: int | None | str = "model"
) -> tuple[list[torch.Tensor], list[int]]:
    """Prefill + DECODE_STEPS greedy decodes; returns the logits rows produced and the new tokens."""
    cfg = model.config
    caches = backend.allocate_kv_cache(
        cfg.num_layers, max(BLOCK_TABLE) + 1, BLOCK_SIZE, cfg.num_kv_heads, cfg.head_dim, model.dtype
    )
    tokens = list(prompt)
    ids = torch.tensor(tokens, dtype=torch.int64)
    hidden = model.forward(ids, torch.arange(len(tokens)), caches, metadata(0, len(tokens), model, window))
    logits = [model.compute_logits(hidden)]  # every prompt position, to compare them all
    new: list[int] = []
    for _ in range(DECODE_STEPS):
        nxt = int(logits[-1][-1].argmax())
        new.append(nxt)
        pos = len(tokens)
        tokens.append(nxt)
        hidden = model.forward(
            torch.tensor([nxt]), torch.tensor([pos]), caches, metadata(pos, 1, model, window)
        )
        logits.append(model.compute_logits(hidden))
    return logits, new


def hf_logits(path, tokens: list[int]) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
    hf.eval()
    with torch.no_grad():
        return hf(torch.tensor([tokens])).logits[0].float()


@pytest.mark.parametrize("family", SUPPORTED_FAMILIES)
def test_forward_matches_transformers(family: str, tiny_model_dir) -> None:
    path = tiny_model_dir(family)
    backend = get_backend("cpu")
    model = load_model(path, backend, dtype="float32", progress=False)
    prompt = prompt_ids(model.config.vocab_size)
    ours, new_tokens = run_greedy(model, backend, prompt)
    ref = hf_logits(path, prompt + new_tokens)
    ours_all = torch.cat(ours)  # rows: prompt positions, then each decode step
    assert ours_all.shape == (PROMPT_LEN + DECODE_STEPS, model.config.vocab_size)
    ref_rows = ref[: PROMPT_LEN + DECODE_STEPS]
    diff = (ours_all - ref_rows).abs().max().item()
    assert diff < 1e-4, f"{family}: max |logit diff| {diff:.2e} vs transformers"
    # Greedy: HF's argmax after each prefix is exactly the token we chose.
    hf_greedy = ref[PROMPT_LEN - 1 : PROMPT_LEN - 1 + DECODE_STEPS].argmax(-1).tolist()
    assert new_tokens == hf_greedy


def test_mistral_sliding_window_changes_output(tiny_model_dir) -> None:
    """The prompt is longer than the tiny Mistral's 32-token window, so dropping the window must
    change the late positions' logits (proving the parity test above exercised it)."""
    backend = get_backend("cpu")
    model = load_model(tiny_model_dir("mistral"), backend, dtype="float32", progress=False)
    assert model.sliding_window is not None and model.sliding_window < PROMPT_LEN
    prompt = prompt_ids(model.config.vocab_size)
    windowed, _ = run_greedy(model, backend, prompt)
    full, _ = run_greedy(model, backend, prompt, window=None)
    w = model.sliding_window
    # Positions inside the first window see the same keys either way.
    assert torch.allclose(windowed[0][:w], full[0][:w], atol=1e-5)
    assert (windowed[0][w:] - full[0][w:]).abs().max() > 1e-2


def test_other_families_have_no_window(tiny_model_dir) -> None:
    backend = get_backend("cpu")
    for family in ("llama", "qwen2", "qwen3"):
        assert load_model(tiny_model_dir(family), backend, progress=False).sliding_window is None
