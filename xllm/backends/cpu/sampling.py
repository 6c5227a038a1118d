"""Logits processing and sampling of the CPU reference backend.

`processed_logits` applies, in float32 and in Hugging Face's order, the min_tokens ban,
repetition / presence / frequency penalties, temperature, top-k, top-p and min-p; removed tokens become -inf and greedy
rows get the penalties only. `sample` takes the argmax for greedy rows and, for random rows,
draws from softmax(processed) with a generator seeded per row from (seed, step), so a request
samples the same tokens alone or inside any batch. Logprobs come from the raw logits.
"""

from __future__ import annotations

import torch

from xllm.hal.metadata import SampleOutput, SamplingMetadata, mask_banned_tokens

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, step: int) -> int:
    """A 64-bit generator seed from (request seed, step), well mixed so nearby pairs differ."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64))


def _token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] int32 occurrence counts; ids >= vocab_size (the padding id) are dropped."""
    ids = token_ids.to(torch.int64).clamp(0, vocab_size)  # pad id vocab_size -> spare column
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.int32)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    return counts[:, :vocab_size]


def _apply_penalties(logits: torch.Tensor, sm: SamplingMetadata) -> None:
    vocab_size = logits.shape[1]
    rows = logits.shape[0]
    empty = torch.full((rows, 1), vocab_size, dtype=torch.int64)
    output_counts = _token_counts(
        sm.output_token_ids if sm.output_token_ids is not None else empty, vocab_size
    )
    prompt_counts = _token_counts(
        sm.prompt_token_ids if sm.prompt_token_ids is not None else empty, vocab_size
    )
    # Repetition penalty (CTRL paper, as HF and vLLM apply it): tokens seen in the prompt or the
    # output have positive logits divided and negative logits multiplied by the penalty.
    seen = (output_counts > 0) | (prompt_counts > 0)
    rep = sm.repetition_penalty.to(torch.float32).unsqueeze(1)
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits.copy_(torch.where(seen, penalised, logits))
    # OpenAI-style presence/frequency penalties count output tokens only (vLLM semantics).
    freq = sm.frequency_penalty.to(torch.float32).unsqueeze(1)
    pres = sm.presence_penalty.to(torch.float32).unsqueeze(1)
    logits -= freq * output_counts + pres * (output_counts > 0)


def _apply_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> None:
    """Top-k alone needs only each row's k-th largest value, not a full sort."""
    enabled = top_k > 0  # greedy and disabled rows carry k = 0 and keep everything
    if not bool(enabled.any()):
        return
    k = top_k.clamp(1, logits.shape[1])
    top_values = logits.topk(int(k[enabled].max()), dim=-1, sorted=True).values
    kth = top_values.gather(1, (k.clamp(max=top_values.shape[1]) - 1).unsqueeze(1))
    kth.masked_fill_(~enabled.unsqueeze(1), float("-inf"))
    logits.masked_fill_(logits < kth, float("-inf"))  # ties with the k-th value stay, as in HF


def _apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Masks logits outside each row's top-k, then outside its top-p nucleus (one sort)."""
    vocab_size = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        # k <= 0 disables: use k = V, whose threshold (the minimum) removes nothing. Ties with the
        # k-th value are kept, as HF's TopKLogitsWarper keeps them.
        k = torch.where(top_k > 0, top_k.to(torch.int64).clamp(max=vocab_size), vocab_size)
        kth = sorted_logits.gather(1, (vocab_size - k).unsqueeze(1))
        sorted_logits.masked_fill_(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        # Ascending order: drop the low tail whose total mass is <= 1 - top_p, which keeps the
        # smallest head whose mass is >= top_p (HF's TopPLogitsWarper); the top token always stays.
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cum <= (1.0 - top_p.to(torch.float32)).unsqueeze(1)
        drop &= (top_p < 1.0).unsqueeze(1)  # a disabled row must not lose zero-probability tokens
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def processed_logits(logits: torch.Tensor, sm: SamplingMetadata) -> torch.Tensor:
    out = logits.to(torch.float32, copy=True)  # never modify the caller's logits
    mask_banned_tokens(out, sm)
    if not sm.no_penalties:
        _apply_penalties(out, sm)
    if sm.all_greedy:
        return out
    temperature = sm.temperature.to(torch.float32)
    greedy = temperature <= 0
    # Greedy rows skip temperature and truncation: divide by 1 and disable their filters.
    out /= torch.where(greedy, 1.0, temperature).unsqueeze(1)
    top_k = None if sm.no_top_k else torch.where(greedy, 0, sm.top_k.to(torch.int64))
    top_p = None if sm.no_top_p else torch.where(greedy, 1.0, sm.top_p.to(torch.float32))
    if top_p is not None:
        out = _apply_top_k_top_p(out, top_k, top_p)
    elif top_k is not None:
        _apply_top_k(out, top_k)
    if not sm.no_min_p:
        min_p = torch.where(greedy, 0.0, sm.min_p.to(torch.float32)).unsqueeze(1)
        probs = out.softmax(dim=-1)
        out.masked_fill_(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))
    return out


def _uniforms(rows: list[int], seeds: list[int], steps: list[int]) -> torch.Tensor:
    """One U[0, 1) float64 per row, each from a generator seeded by its (seed, step)."""
    out = torch.empty(len(rows), dtype=torch.float64)
    gen = torch.Generator(device="cpu")
    for j, i in enumerate(rows):
        gen.manual_seed(row_seed(seeds[i], steps[i]))
        out[j] = torch.rand((), dtype=torch.float64, generator=gen)
    return out


def _inverse_cdf(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Token j of row i such that cdf[j-1] <= u * total < cdf[j]: an exact draw from probs.

    A zero-probability token repeats the previous cdf value, so it can never be the first one
    above the target. Needs one random number per row instead of one per vocabulary entry.
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    target = (u * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return tokens.clamp_(max=probs.shape[1] - 1)


def sample(logits: torch.Tensor, sm: SamplingMetadata) -> SampleOutput:
    if sm.all_greedy and sm.no_penalties and sm.banned is None:
        tokens = logits.argmax(dim=-1)  # fast path: no copy, no sort
    else:
        processed = processed_logits(logits, sm)
        tokens = processed.argmax(dim=-1)
        if not sm.all_greedy:
            random_rows = (sm.temperature > 0).nonzero().flatten()
            rows = random_rows.tolist()
            u = _uniforms(rows, sm.seeds.tolist(), sm.steps.tolist())
            tokens[random_rows] = _inverse_cdf(processed[random_rows].softmax(dim=-1), u)
    tokens = tokens.to(torch.int64)
    if sm.max_num_logprobs < 0:
        return SampleOutput(sampled_token_ids=tokens)
    logprobs = logits.to(torch.float32).log_softmax(dim=-1)
    sampled = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    k = min(sm.max_num_logprobs, logits.shape[1])
    top_values, top_ids = logprobs.topk(k, dim=-1, largest=True, sorted=True)
    return SampleOutput(
        sampled_token_ids=tokens,
        sampled_logprobs=sampled,
        top_logprobs=top_values,
        top_token_ids=top_ids.to(torch.int64),
    )
