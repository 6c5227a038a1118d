"""The reference logits processing and seeded sampling, in plain torch, for every backend to reuse.

`SamplingMetadata` fixes what sampling means; this module is that meaning written once, with
device-agnostic torch ops: the CPU backend runs it as is, the CUDA backend runs it on the GPU, the
Ascend backend on the NPU. A backend with a fused kernel for one step may replace that step, but
not the random stream: row i of a batch draws exactly one U[0, 1) number, from a host
`torch.Generator` seeded with ``row_seed(seeds[i], steps[i])``, and picks the token where that
number falls in the float64 cumulative sum of its processed probabilities (`inverse_cdf`). So the
same seed gives the same tokens on every backend whose probabilities agree to the draw's
resolution, alone or in any batch. Backends import these helpers from `xllm.hal`, never from
another backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from xllm.hal.metadata import SampleOutput, SamplingMetadata

_MASK64 = (1 << 64) - 1


def splitmix64(x: int) -> int:
    """One output of SplitMix64 (Steele, Lea, Flood 2014) for state ``x``: a 64-bit mixer."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def row_seed(seed: int, step: int) -> int:
    """A 64-bit generator seed from (request seed, tokens sampled so far), mixed so that nearby
    pairs differ: SplitMix64 of the seed, xor the step, SplitMix64 again."""
    return splitmix64(splitmix64(seed & _MASK64) ^ (step & _MASK64))


def row_uniforms(seeds: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    """[N] float64 on the host: row i's one U[0, 1) draw, from a CPU `torch.Generator` (MT19937)
    seeded with ``row_seed(seeds[i], steps[i])``. Drawn on the host on every backend, so the
    stream never depends on a device's own RNG."""
    out = torch.empty(len(seeds), dtype=torch.float64)
    gen = torch.Generator(device="cpu")
    for i, (seed, step) in enumerate(zip(seeds, steps, strict=True)):
        gen.manual_seed(row_seed(seed, step))
        out[i] = torch.rand((), dtype=torch.float64, generator=gen)
    return out


@dataclass(frozen=True, slots=True)
class RandomDraws:
    """The rows of a batch that draw at random (temperature > 0) and their host uniforms."""

    rows: list[int]
    uniforms: torch.Tensor  # [len(rows)] float64, on the host


def random_draws(sampling: SamplingMetadata) -> RandomDraws:
    """Reads temperature, seeds and steps to the host in one transfer and draws each random row's
    uniform. Greedy rows draw nothing, so an all-greedy batch never reads the device."""
    if sampling.all_greedy:
        return RandomDraws([], torch.empty(0, dtype=torch.float64))
    host = torch.stack(
        (
            sampling.seeds.to(torch.int64),
            sampling.steps.to(torch.int64),
            (sampling.temperature > 0).to(torch.int64),
        )
    ).tolist()
    rows = [i for i, random in enumerate(host[2]) if random]
    return RandomDraws(rows, row_uniforms([host[0][i] for i in rows], [host[1][i] for i in rows]))


def inverse_cdf(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Token j of each row with ``cdf[j-1] <= u * total < cdf[j]``: an exact draw from probs.

    The cumulative sum is float64 on every backend, so float32 probabilities that agree give the
    same token. A zero-probability token repeats the previous cdf value, so it is never the first
    entry above the target. One random number per row, not one per vocabulary entry.
    """
    cdf = probs.to(torch.float64).cumsum(dim=-1)
    target = (uniforms.to(cdf.device, torch.float64) * cdf[:, -1]).unsqueeze(1)
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1)
    return tokens.clamp_(max=probs.shape[1] - 1)


# ---------------------------------------------------------------------------- processing


def mask_banned_tokens(logits: torch.Tensor, sampling: SamplingMetadata) -> None:
    """Sets the logits of ``sampling.banned`` (row, token) pairs to -inf, in place.

    One index_put, no per-row Python, so min_tokens means the same thing everywhere; a no-op when
    nothing is banned.
    """
    if sampling.banned is not None:
        banned = sampling.banned.to(logits.device)
        logits.index_put_((banned[:, 0], banned[:, 1]), torch.tensor(float("-inf"), device=logits.device))


def token_counts(token_ids: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] int32 occurrence counts on token_ids' device; the padding id vocab_size lands in a
    spare column, which is dropped."""
    ids = token_ids.to(torch.int64).clamp(0, vocab_size)
    counts = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.int32, device=ids.device)
    counts.scatter_add_(1, ids, torch.ones_like(ids, dtype=torch.int32))
    return counts[:, :vocab_size]


def apply_penalties(logits: torch.Tensor, sampling: SamplingMetadata) -> None:
    """Repetition, then frequency and presence penalties, in place on float32 [B, V] logits."""
    rows, vocab_size = logits.shape
    device = logits.device
    empty = torch.full((rows, 1), vocab_size, dtype=torch.int64, device=device)
    out_ids = sampling.output_token_ids if sampling.output_token_ids is not None else empty
    prompt_ids = sampling.prompt_token_ids if sampling.prompt_token_ids is not None else empty
    output_counts = token_counts(out_ids.to(device), vocab_size)
    prompt_counts = token_counts(prompt_ids.to(device), vocab_size)
    # Repetition penalty (CTRL paper, as HF and vLLM apply it): tokens seen in the prompt or the
    # output have positive logits divided and negative logits multiplied by the penalty.
    seen = (output_counts > 0) | (prompt_counts > 0)
    rep = sampling.repetition_penalty.to(device, torch.float32).unsqueeze(1)
    logits.copy_(torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits))
    # OpenAI-style presence/frequency penalties count output tokens only (vLLM semantics).
    freq = sampling.frequency_penalty.to(device, torch.float32).unsqueeze(1)
    pres = sampling.presence_penalty.to(device, torch.float32).unsqueeze(1)
    logits -= freq * output_counts + pres * (output_counts > 0)


def mask_top_k(logits: torch.Tensor, top_k: torch.Tensor) -> None:
    """Top-k alone, in place: needs each row's k-th largest value only, not a full sort (one
    host read of the largest k sizes the topk)."""
    enabled = top_k > 0  # greedy and disabled rows carry k = 0 and keep everything
    k = top_k.clamp(1, logits.shape[1])
    k_max = int(torch.where(enabled, k, 0).max())
    if k_max == 0:
        return
    top_values = logits.topk(k_max, dim=-1, sorted=True).values
    kth = top_values.gather(1, (k.clamp(max=k_max) - 1).unsqueeze(1))
    kth.masked_fill_(~enabled.unsqueeze(1), float("-inf"))
    logits.masked_fill_(logits < kth, float("-inf"))  # ties with the k-th value stay, as in HF


def mask_top_k_top_p(
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
        drop = cum <= (1.0 - top_p).unsqueeze(1)
        drop &= (top_p < 1.0).unsqueeze(1)  # a disabled row must not lose zero-probability tokens
        drop[:, -1] = False
        sorted_logits.masked_fill_(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def mask_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> None:
    """Drops, in place, tokens less likely than min_p times the row's most likely token."""
    probs = logits.softmax(dim=-1)
    logits.masked_fill_(probs < min_p.unsqueeze(1) * probs.amax(dim=-1, keepdim=True), float("-inf"))


def processed_logits(logits: torch.Tensor, sampling: SamplingMetadata) -> torch.Tensor:
    """Float32 logits after, in Hugging Face's order, the min_tokens ban, repetition / presence /
    frequency penalties, temperature, top-k, top-p and min-p; removed tokens are -inf and greedy
    rows get the ban and the penalties only. The caller's logits are never modified."""
    sm = sampling
    out = logits.to(torch.float32, copy=True)
    device = out.device
    mask_banned_tokens(out, sm)
    if not sm.no_penalties:
        apply_penalties(out, sm)
    if sm.all_greedy:
        return out
    temperature = sm.temperature.to(device, torch.float32)
    greedy = temperature <= 0
    # Greedy rows skip temperature and truncation: divide by 1 and disable their filters.
    out /= torch.where(greedy, 1.0, temperature).unsqueeze(1)
    top_k = None if sm.no_top_k else torch.where(greedy, 0, sm.top_k.to(device, torch.int64))
    top_p = None if sm.no_top_p else torch.where(greedy, 1.0, sm.top_p.to(device, torch.float32))
    if top_p is not None:
        out = mask_top_k_top_p(out, top_k, top_p)
    elif top_k is not None:
        mask_top_k(out, top_k)
    if not sm.no_min_p:
        mask_min_p(out, torch.where(greedy, 0.0, sm.min_p.to(device, torch.float32)))
    return out


# ---------------------------------------------------------------------------- sampling


def sample(
    logits: torch.Tensor, sampling: SamplingMetadata, draws: RandomDraws | None = None
) -> SampleOutput:
    """Greedy rows take the argmax of the processed logits; random rows draw by `inverse_cdf` from
    softmax(processed) with their host uniforms (`random_draws(sampling)` unless the caller drew
    them already). Logprobs come from the raw logits, as OpenAI and vLLM report them."""
    sm = sampling
    if sm.all_greedy and sm.no_penalties and sm.banned is None:
        tokens = logits.argmax(dim=-1)  # fast path: no copy, no sort
    else:
        processed = processed_logits(logits, sm)
        tokens = processed.argmax(dim=-1)
        draws = random_draws(sm) if draws is None else draws
        if draws.rows:
            rows = torch.tensor(draws.rows, dtype=torch.int64).to(logits.device, non_blocking=True)
            probs = processed.index_select(0, rows).softmax(dim=-1)
            tokens[rows] = inverse_cdf(probs, draws.uniforms)
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
