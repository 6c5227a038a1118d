"""Sampling for the CUDA backend: logits processing and per-row seeded draws, as batched torch ops.

Order (Hugging Face's logits-processor order, as the contract fixes): penalties -> temperature ->
top-k -> top-p -> min-p. Top-k and top-p share one ascending sort, as vLLM's sampler does; a batch
that needs neither is never sorted, and greedy rows are an argmax of the penalised logits.

Randomness is a counter-based generator rather than a stateful `torch.Generator`: each row's
uniforms are a hash of ``(seeds[i], steps[i], token_id)`` (murmur3's 32-bit finaliser, chained), and
the draw is an exponential race, ``argmax(logits - log(E))`` with ``E = -log(U)``, which picks
token j with probability softmax(logits)_j (the Gumbel-max trick). Every row is independent of
the batch it sits in, nothing is per-row Python, and the whole step is capturable in a CUDA graph.
"""

from __future__ import annotations

import torch

from xllm.hal import SampleOutput, SamplingMetadata, mask_banned_tokens

_M32 = 0xFFFFFFFF


def _as_int32(value: int) -> int:
    """A 32-bit pattern as the signed int32 torch stores it."""
    value &= _M32
    return value - (1 << 32) if value >= 1 << 31 else value


_C1 = _as_int32(0x85EBCA6B)
_C2 = _as_int32(0xC2B2AE35)
_GOLDEN = _as_int32(0x9E3779B9)


def _shr(h: torch.Tensor, bits: int) -> torch.Tensor:
    # Logical right shift of int32 bit patterns: torch shifts arithmetically, so mask the sign copies.
    return (h >> bits) & ((1 << (32 - bits)) - 1)


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """murmur3's finaliser on int32 tensors (multiplication wraps mod 2^32, as the hash expects)."""
    h = h ^ _shr(h, 16)
    h = h * _C1
    h = h ^ _shr(h, 13)
    h = h * _C2
    return h ^ _shr(h, 16)


def _row_keys(seeds: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """One int32 key per row from its 64-bit seed and its step counter."""
    seeds = seeds.to(torch.int64)
    steps = steps.to(torch.int64)
    lo = (seeds & _M32).to(torch.int64)
    hi = ((seeds >> 32) & _M32).to(torch.int64)

    def i32(x: torch.Tensor) -> torch.Tensor:
        return torch.where(x >= 1 << 31, x - (1 << 32), x).to(torch.int32)

    key = _fmix32(i32(lo) ^ _GOLDEN)
    key = _fmix32(key ^ i32(hi))
    key = _fmix32(key ^ i32(steps & _M32))
    return _fmix32(key ^ i32((steps >> 32) & _M32))


def uniform_noise(seeds: torch.Tensor, steps: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """[B, V] float32 uniforms in (0, 1), a pure function of (seed, step, token id) per row."""
    cols = _fmix32(torch.arange(vocab_size, dtype=torch.int32, device=seeds.device) * _GOLDEN + 1)
    bits = _fmix32(_row_keys(seeds, steps)[:, None] ^ cols[None, :])
    # 24 random bits fill a float32 mantissa exactly; +0.5 keeps U away from 0 and 1.
    return (_shr(bits, 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def apply_penalties(logits: torch.Tensor, s: SamplingMetadata) -> torch.Tensor:
    """Repetition (prompt + output tokens, HF's divide-positive/multiply-negative rule), then
    frequency and presence (output tokens only, OpenAI's definition)."""
    batch, vocab = logits.shape
    out_ids = s.output_token_ids
    prompt_ids = s.prompt_token_ids
    # Histories are padded with vocab_size: scatter into a vocab+1 wide buffer and drop the pad column.
    counts = torch.zeros((batch, vocab + 1), dtype=torch.float32, device=logits.device)
    if out_ids is not None:
        counts.scatter_add_(
            1, out_ids.long(), torch.ones(out_ids.shape, dtype=torch.float32, device=logits.device)
        )
    counts = counts[:, :vocab]
    seen = counts > 0
    if prompt_ids is not None:
        in_prompt = torch.zeros((batch, vocab + 1), dtype=torch.bool, device=logits.device)
        in_prompt.scatter_(1, prompt_ids.long(), True)
        seen = seen | in_prompt[:, :vocab]
    rep = s.repetition_penalty.to(torch.float32)[:, None]
    penalised = torch.where(logits > 0, logits / rep, logits * rep)
    logits = torch.where(seen, penalised, logits)
    freq = s.frequency_penalty.to(torch.float32)[:, None]
    pres = s.presence_penalty.to(torch.float32)[:, None]
    return logits - (freq * counts + pres * (counts > 0).to(torch.float32))


def apply_top_k_top_p(
    logits: torch.Tensor, top_k: torch.Tensor | None, top_p: torch.Tensor | None
) -> torch.Tensor:
    """Masks to -inf what top-k and then top-p remove; rows with k <= 0 / p >= 1 are untouched.

    Top-p keeps the smallest set of most likely tokens whose probability reaches p (HF's
    TopPLogitsWarper: in ascending order, drop tokens whose cumulative mass is <= 1 - p), always
    keeping the most likely token.
    """
    vocab = logits.shape[1]
    sorted_logits, order = logits.sort(dim=-1, descending=False)
    if top_k is not None:
        k = top_k.to(torch.int64)
        k = torch.where((k <= 0) | (k > vocab), vocab, k)
        kth = sorted_logits.gather(1, (vocab - k)[:, None])
        sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, float("-inf"))
    if top_p is not None:
        p = top_p.to(torch.float32)[:, None]
        cum = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = (cum <= 1.0 - p) & (p < 1.0)
        drop[:, -1] = False
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
    return torch.empty_like(logits).scatter_(1, order, sorted_logits)


def apply_min_p(logits: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drops tokens whose probability is below min_p times the most likely token's."""
    probs = logits.softmax(dim=-1)
    threshold = min_p.to(torch.float32)[:, None] * probs.amax(dim=-1, keepdim=True)
    return logits.masked_fill(probs < threshold, float("-inf"))


def processed_logits(logits: torch.Tensor, s: SamplingMetadata) -> torch.Tensor:
    x = logits.to(torch.float32)
    if x is logits and (s.no_penalties or s.banned is not None):
        x = x.clone()  # the caller's logits are never modified
    mask_banned_tokens(x, s)
    if not s.no_penalties:
        x = apply_penalties(x, s)
    if s.all_greedy:
        return x
    greedy = s.temperature == 0
    temp = torch.where(greedy, torch.ones_like(s.temperature), s.temperature).to(torch.float32)
    processed = x / temp[:, None]
    if not (s.no_top_k and s.no_top_p):
        processed = apply_top_k_top_p(
            processed, None if s.no_top_k else s.top_k, None if s.no_top_p else s.top_p
        )
    if not s.no_min_p:
        processed = apply_min_p(processed, s.min_p)
    # Greedy rows get penalties only: no temperature and no truncation.
    return torch.where(greedy[:, None], x, processed)


def sample(logits: torch.Tensor, s: SamplingMetadata) -> SampleOutput:
    x = processed_logits(logits, s)
    if s.all_greedy:
        tokens = x.argmax(dim=-1)
    else:
        noise = uniform_noise(s.seeds, s.steps, x.shape[1])
        # Exponential race: argmax_j logits_j - log(E_j), E_j = -log(U_j) ~ Exp(1).
        raced = x - torch.log(-torch.log(noise))
        tokens = torch.where(s.temperature == 0, x.argmax(dim=-1), raced.argmax(dim=-1))
    out = SampleOutput(sampled_token_ids=tokens.to(torch.int64))
    if s.max_num_logprobs >= 0:
        # Logprobs of the raw model distribution, before any processing (OpenAI's and vLLM's choice).
        logprobs = torch.log_softmax(logits.to(torch.float32), dim=-1)
        out.sampled_logprobs = logprobs.gather(1, out.sampled_token_ids[:, None]).squeeze(1)
        k = min(s.max_num_logprobs, logprobs.shape[1])
        top = logprobs.topk(k, dim=-1)
        out.top_logprobs = top.values
        out.top_token_ids = top.indices.to(torch.int64)
    return out
