"""Speculative decoding by n-gram prompt lookup: guess the next tokens from the text so far.

Generated text repeats itself (code, lists, quotes of the prompt, and the loops small models fall
into), so the tokens that followed the last earlier occurrence of the sequence's final n tokens
are a cheap guess for what comes next (vLLM's and transformers' prompt lookup). The engine appends
the guess to a greedy sequence, runs all of it through one forward pass, and keeps the longest
prefix of the guess that greedy decoding would have produced, plus the model's own next token:
every step still yields at least one token, and the output is exactly the plain greedy one.
"""

from __future__ import annotations

from collections.abc import Sequence as Seq

from xllm.engine.sequence import Sequence


def propose_ngram(token_ids: Seq[int], k: int, max_n: int, min_n: int = 1) -> list[int]:
    """Up to `k` tokens that followed the most recent earlier occurrence of the last n tokens,
    for the longest n in [min_n, max_n] that has one; [] when none does. A continuation that
    reaches the end of the text goes on copying itself (a loop of period p repeats with p)."""
    length = len(token_ids)
    for n in range(min(max_n, length - 1), min_n - 1, -1):
        pattern = list(token_ids[length - n :])
        first = pattern[0]
        # Latest match first: the nearest context is the best guess of what repeats.
        for start in range(length - n - 1, -1, -1):
            if token_ids[start] == first and list(token_ids[start : start + n]) == pattern:
                extended = list(token_ids)
                for j in range(k):
                    extended.append(extended[start + n + j])
                return extended[length:]
    return []


def can_speculate(seq: Sequence) -> bool:
    """Greedy, single-sample requests whose next-token choice depends on nothing that changes
    within a step (no penalties, logprobs or min_tokens ban left), so every verified row is the
    token plain decoding would sample."""
    p = seq.params
    return (
        p.n == 1
        and p.temperature == 0.0
        and not p.uses_penalties
        and p.logprobs is None
        and seq.num_output_tokens >= p.min_tokens
        and seq.num_tokens - seq.num_computed_tokens == 1
    )
