"""Case kinds for the HAL ops: which shapes are tried, and how each result is compared.

Each kind has a builder (the case list: small, medium and edge shapes in float32, bfloat16 and
float16) and a check that generates the case's inputs from its seed on the CPU, hands each side
its own copy on its own device, calls the same public op on both and compares the results with
the case's `Checker`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from xllm.hal.conformance import inputs as gen_inputs
from xllm.hal.conformance.cases import DTYPES, Case, make_case, register_kind
from xllm.hal.conformance.compare import Checker
from xllm.hal.conformance.inputs import generator, randn, to_device
from xllm.hal.conformance.numpy_ref import draw_margin, log_softmax, process_logits, softmax, to_numpy
from xllm.hal.metadata import SamplingMetadata
from xllm.hal.sampling_ops import row_uniforms


def _both(backend: Any, reference: Any, call: Callable[[Any, Any], Any], inputs: Any) -> tuple[Any, Any]:
    """Runs `call(side, inputs)` on each side with its own device copy of the inputs."""
    mine = to_device(inputs, backend.device())
    out_backend = call(backend, mine)
    backend.synchronize()
    theirs = to_device(inputs, reference.device())
    out_reference = call(reference, theirs)
    return (out_backend, mine), (out_reference, theirs)


# ---------------------------------------------------------------------------------- rms_norm


def _build_rms_norm() -> list[Case]:
    shapes = [((1, 64), True), ((7, 128), True), ((16, 1024), False), ((2, 5, 96), False)]
    cases = []
    for dtype in DTYPES:
        for shape, small in shapes:
            for residual in (False, True):
                eps = 1e-5 if shape[-1] == 128 else 1e-6
                cases.append(
                    make_case("rms_norm", dtype, small=small, shape=shape, eps=eps, residual=residual)
                )
    return cases


def _check_rms_norm(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    p, gen = case.p, generator(case.seed)
    shape = p["shape"]
    data = {
        "x": randn(gen, shape, case.dtype),
        "weight": (1.0 + randn(gen, (shape[-1],), torch.float32, 0.1)).to(case.dtype),
        "residual": randn(gen, shape, case.dtype) if p["residual"] else None,
    }

    def call(side: Any, d: dict) -> Any:
        return side.rms_norm(d["x"], d["weight"], p["eps"], residual=d["residual"])

    (out, mine), (ref, _) = _both(backend, reference, call, data)
    if p["residual"]:
        if not (isinstance(out, tuple) and len(out) == 2):
            chk.fail(f"with a residual rms_norm must return (normed, residual), got {type(out).__name__}")
            return
        chk.close("normed", out[0], ref[0])
        chk.close("residual", out[1], ref[1])
    else:
        chk.close("normed", out, ref)
    # Inputs must not be modified.
    chk.exact("x unchanged", mine["x"], data["x"])
    if p["residual"]:
        chk.exact("residual input unchanged", mine["residual"], data["residual"])


# ---------------------------------------------------------------------------------- rotary


def _build_rotary() -> list[Case]:
    configs = [
        # (T, hq, hkv, d, rot_dim, neox, small)
        (1, 4, 1, 64, 64, True, True),
        (6, 8, 2, 128, 128, True, True),
        (6, 8, 2, 128, 128, False, True),
        (5, 4, 4, 64, 32, True, False),  # partial rotary (rot_dim < head_dim)
        (5, 4, 2, 128, 64, False, False),  # partial, GPT-J style
        (17, 16, 8, 64, 64, False, False),
    ]
    return [
        make_case(
            "rotary_embedding",
            dtype,
            small=small,
            T=t,
            hq=hq,
            hkv=hkv,
            d=d,
            rot=rot,
            style="neox" if neox else "gptj",
        )
        for dtype in DTYPES
        for t, hq, hkv, d, rot, neox, small in configs
    ]


def _check_rotary(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    p, gen = case.p, generator(case.seed)
    max_position = 4096
    data = {
        "positions": torch.randint(0, max_position, (p["T"],), generator=gen, dtype=torch.int64),
        "q": randn(gen, (p["T"], p["hq"], p["d"]), case.dtype),
        "k": randn(gen, (p["T"], p["hkv"], p["d"]), case.dtype),
        "cache": gen_inputs.cos_sin_cache(max_position, p["rot"]),
    }
    neox = p["style"] == "neox"

    def call(side: Any, d: dict) -> Any:
        return side.rotary_embedding(d["positions"], d["q"], d["k"], d["cache"], neox)

    (out, _), (ref, _) = _both(backend, reference, call, data)
    chk.close("q", out[0], ref[0])
    chk.close("k", out[1], ref[1])


# ---------------------------------------------------------------------------------- embedding


def _build_embedding() -> list[Case]:
    shapes = [(1, 50, 64, True), (9, 1000, 96, True), (33, 512, 768, False)]  # (T, vocab, hidden)
    return [
        make_case("embedding", dtype, small=small, T=t, vocab=vocab, hidden=hidden)
        for dtype in DTYPES
        for t, vocab, hidden, small in shapes
    ]


def _check_embedding(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    p, gen = case.p, generator(case.seed)
    ids = torch.randint(0, p["vocab"], (p["T"],), generator=gen, dtype=torch.int64)
    ids[0] = p["vocab"] - 1  # the last row too
    data = {"ids": ids, "weight": randn(gen, (p["vocab"], p["hidden"]), case.dtype)}
    (out, _), (ref, _) = _both(
        backend, reference, lambda side, d: side.embedding(d["ids"], d["weight"]), data
    )
    chk.exact("rows", out, ref)


# ---------------------------------------------------------------------------------- gated activations


def _build_silu() -> list[Case]:
    shapes = [((1, 128), True), ((7, 704), True), ((2, 3, 256), False), ((16, 2752), False)]
    return [
        make_case("silu_and_mul", dtype, small=small, shape=shape)
        for dtype in DTYPES
        for shape, small in shapes
    ]


def _check_silu(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    x = randn(generator(case.seed), case.p["shape"], case.dtype, scale=2.0)
    (out, mine), (ref, _) = _both(backend, reference, lambda side, d: side.silu_and_mul(d), x)
    chk.close("out", out, ref)
    chk.exact("x unchanged", mine, x)


def _build_gelu() -> list[Case]:
    shapes = [((1, 128), True), ((7, 704), False), ((2, 3, 256), False)]
    return [
        make_case("gelu_and_mul", dtype, small=small, shape=shape, approximate=approx)
        for dtype in DTYPES
        for approx in ("none", "tanh")
        for shape, small in shapes
    ]


def _check_gelu(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    x = randn(generator(case.seed), case.p["shape"], case.dtype, scale=2.0)
    approx = case.p["approximate"]
    (out, _), (ref, _) = _both(backend, reference, lambda side, d: side.gelu_and_mul(d, approx), x)
    chk.close("out", out, ref)


# ---------------------------------------------------------------------------------- linear


def _build_linear() -> list[Case]:
    # (tokens, in, out, bias, small): a single decode row, a few rows over a wide projection
    # (backends split such GEMVs across cores), and a prefill-sized block.
    shapes = [
        (1, 64, 256, False, True),
        (3, 128, 4096, True, True),
        (1, 256, 3072, False, False),
        (64, 256, 512, True, False),
    ]
    return [
        make_case("linear", dtype, small=small, T=t, n_in=n_in, n_out=n_out, bias=bias)
        for dtype in DTYPES
        for t, n_in, n_out, bias, small in shapes
    ]


def _check_linear(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    p, gen = case.p, generator(case.seed)
    data = {
        "x": randn(gen, (p["T"], p["n_in"]), case.dtype),
        "w": randn(gen, (p["n_out"], p["n_in"]), case.dtype, scale=p["n_in"] ** -0.5),
        "b": randn(gen, (p["n_out"],), case.dtype) if p["bias"] else None,
    }
    (out, mine), (ref, _) = _both(
        backend, reference, lambda side, d: side.linear(d["x"], d["w"], d["b"]), data
    )
    chk.close("out", out, ref)
    chk.exact("x unchanged", mine["x"], data["x"])


# ---------------------------------------------------------------------------------- reshape_and_cache


def _build_reshape_and_cache() -> list[Case]:
    configs = [
        # (T, hkv, d, bs, num_blocks, padded tokens, small)
        (1, 1, 64, 16, 4, 0, True),
        (20, 2, 128, 16, 6, 3, True),
        (40, 8, 64, 32, 5, 5, False),
        (33, 4, 128, 32, 3, 0, False),
    ]
    return [
        make_case("reshape_and_cache", dtype, small=small, T=t, hkv=hkv, d=d, bs=bs, blocks=nb, pad=pad)
        for dtype in DTYPES
        for t, hkv, d, bs, nb, pad, small in configs
    ]


def _check_reshape_and_cache(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    p, gen = case.p, generator(case.seed)
    t, hkv, d, bs, nb = p["T"], p["hkv"], p["d"], p["bs"], p["blocks"]
    real = t - p["pad"]
    slots = torch.randperm(nb * bs, generator=gen)[:real].to(torch.int64)
    # Padding tokens (slot -1) are interleaved at random places among the real ones.
    slot_mapping = torch.full((t,), -1, dtype=torch.int64)
    slot_mapping[torch.randperm(t, generator=gen)[:real].sort().values] = slots
    cache_shape = (nb, bs, hkv, d)
    data = {
        "k": randn(gen, (t, hkv, d), case.dtype),
        "v": randn(gen, (t, hkv, d), case.dtype),
        # Sentinel contents: every slot not written must still hold exactly these values.
        "k_cache": randn(gen, cache_shape, case.dtype, scale=7.0),
        "v_cache": randn(gen, cache_shape, case.dtype, scale=7.0),
        "slot_mapping": slot_mapping,
    }

    def call(side: Any, dd: dict) -> None:
        side.reshape_and_cache(dd["k"], dd["v"], dd["k_cache"], dd["v_cache"], dd["slot_mapping"])

    (_, mine), (_, theirs) = _both(backend, reference, call, data)
    written = torch.zeros(nb * bs, dtype=torch.bool)
    written[slots] = True
    for name in ("k_cache", "v_cache"):
        got = mine[name].to("cpu").reshape(nb * bs, hkv, d)
        want = theirs[name].to("cpu").reshape(nb * bs, hkv, d)
        before = data[name].reshape(nb * bs, hkv, d)
        chk.exact(f"{name} written slots", got[written], want[written])
        chk.exact(f"{name} sentinel (unwritten slots untouched)", got[~written], before[~written])


# ---------------------------------------------------------------------------------- attention

# Batches as (cached prefix length, query length) per sequence. Prefixes are chosen to end just
# before, on and just after block borders (15, 16, 17, 33 with block size 16).
_SEQS: dict[str, list[tuple[int, int]]] = {
    "decode1": [(37, 1)],
    "decode4": [(0, 1), (15, 1), (16, 1), (47, 1)],
    "decode3": [(0, 1), (31, 1), (63, 1)],
    "prefill": [(0, 7), (0, 33)],
    "chunk": [(17, 16), (40, 9)],
    "mixed3": [(33, 1), (0, 13), (18, 7)],
    "mixed4": [(15, 1), (0, 17), (20, 6), (50, 1)],
}


def _build_attention() -> list[Case]:
    configs = [
        # (hq, hkv, d, bs, window, seqs, label, small): GQA ratios 1, 4 and 8; head_dim 64 / 128;
        # block sizes 16 / 32; with and without a sliding window.
        (8, 8, 64, 16, None, "decode1", "decode", True),
        (8, 2, 64, 16, None, "mixed3", "mixed", True),
        (8, 2, 64, 16, 8, "mixed3", "mixed", True),
        (8, 1, 128, 32, None, "mixed3", "mixed", False),
        # Small too: its 33-token prefill crosses two block borders, where causal-mask
        # off-by-ones hide (the interpreted CUDA run uses only the small cases).
        (4, 1, 128, 16, None, "prefill", "prefill", True),
        (4, 4, 128, 32, 16, "chunk", "chunk", False),
        (8, 2, 128, 16, None, "decode4", "decode", False),
        (16, 2, 64, 32, 24, "mixed4", "mixed", False),
        (8, 8, 64, 16, 5, "decode3", "decode", False),
    ]
    return [
        make_case(
            "attention",
            dtype,
            small=small,
            label=label,
            B=len(_SEQS[seqs]),
            hq=hq,
            hkv=hkv,
            d=d,
            bs=bs,
            win=win,
            _seqs=tuple(_SEQS[seqs]),
        )
        for dtype in DTYPES
        for hq, hkv, d, bs, win, seqs, label, small in configs
    ]


def _check_attention(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    p = case.p
    batch = gen_inputs.paged_batch(
        generator(case.seed), list(p["_seqs"]), p["hq"], p["hkv"], p["d"], p["bs"], case.dtype, p["win"]
    )
    data = {
        "q": batch.q,
        "k": batch.k,
        "v": batch.v,
        "kc": batch.k_cache,
        "vc": batch.v_cache,
        "md": batch.metadata,
    }

    def call(side: Any, d: dict) -> torch.Tensor:
        return side.attention(d["q"], d["k"], d["v"], d["kc"], d["vc"], d["md"])

    (out, mine), (ref, _) = _both(backend, reference, call, data)
    chk.close("out", out, ref)
    chk.exact("k_cache unchanged", mine["kc"], batch.k_cache)


# ---------------------------------------------------------------------------------- sampling

VOCAB = 1000

# Per-row settings of each sampling mix; keys are SamplingMetadata.from_lists arguments.
_MIXES: dict[str, list[dict[str, Any]]] = {
    "temperature": [{"temperature": 0.5}, {"temperature": 1.0}, {"temperature": 1.7}],
    "top_k": [{"top_k": 1}, {"top_k": 7}, {"top_k": 100}, {"top_k": 0}],
    "top_p": [{"top_p": 0.3}, {"top_p": 0.9}, {"top_p": 0.99}, {"top_p": 1.0}],
    "min_p": [{"min_p": 0.02}, {"min_p": 0.1}, {"min_p": 0.5}],
    "penalties": [
        {"temperature": 0.0, "repetition_penalty": 1.3},
        {"repetition_penalty": 0.8, "presence_penalty": 0.5},
        {"temperature": 0.8, "frequency_penalty": 0.7},
        {"repetition_penalty": 1.1, "presence_penalty": -0.4, "frequency_penalty": 0.3},
    ],
    "mixed": [
        {"temperature": 0.0},
        {"temperature": 0.7, "top_k": 50, "top_p": 0.9},
        {"temperature": 1.3, "top_p": 0.8, "min_p": 0.05, "repetition_penalty": 1.2},
        {"temperature": 1.0, "top_k": 20, "min_p": 0.1, "frequency_penalty": 0.2},
        {"temperature": 0.0, "presence_penalty": 1.0},
    ],
    "greedy": [{"temperature": 0.0}, {"temperature": 0.0}, {"temperature": 0.0}, {"temperature": 0.0}],
    # min_tokens: each row's `ban_top` most likely tokens are banned (an EOS that is the argmax).
    "banned": [
        {"temperature": 0.0, "ban_top": 1},
        {"temperature": 0.0, "ban_top": 3, "repetition_penalty": 1.3},
        {"temperature": 0.0},
        {"temperature": 0.9, "ban_top": 2, "top_k": 20},
        {"temperature": 1.1, "ban_top": 1, "top_p": 0.9},
    ],
    "greedy_penalties": [
        {"temperature": 0.0, "repetition_penalty": 1.5},
        {"temperature": 0.0, "frequency_penalty": 0.5, "presence_penalty": 0.5},
        {"temperature": 0.0},
    ],
    "seeded": [
        {"temperature": 0.0},
        {"temperature": 0.8},
        {"temperature": 1.0, "top_k": 20},
        {"temperature": 1.2, "top_p": 0.9},
        {"temperature": 0.7, "min_p": 0.1, "repetition_penalty": 1.2},
    ],
}


def _sampling_inputs(
    case: Case, rows: list[dict[str, Any]], draws: bool = False
) -> tuple[torch.Tensor, list[dict[str, Any]]]:
    """Logits in the case dtype and complete per-row settings (histories, seeds, steps).

    Seeds are retried until no token sits near a top-p or min-p cut (see `process_logits`),
    every greedy row's winner leads by 1e-4 relative and, with `draws`, every random row's draw
    target sits clear of its cumulative-probability boundaries (`draw_margin`): there float32 and
    float64 could legitimately disagree, and the suite must not blame a backend for a coin toss.
    """
    seed = case.seed
    for _attempt in range(200):
        gen = generator(seed)
        logits = gen_inputs.distinct_logits(gen, len(rows), VOCAB).to(case.dtype)
        full = []
        for i, row in enumerate(rows):
            r = {"temperature": 1.0, **row}
            r["seed"] = int(torch.randint(0, 2**31, (1,), generator=gen))
            r["step"] = int(torch.randint(0, 50, (1,), generator=gen))
            r["prompt"] = gen_inputs.random_history(gen, VOCAB, 12 + 3 * i)
            r["output"] = gen_inputs.random_history(gen, VOCAB, 2 * i)
            r["banned"] = logits[i].float().topk(r.pop("ban_top", 0)).indices.tolist()
            full.append(r)
        margins: list[float] = []
        processed = process_logits(to_numpy(logits), _metadata(full), margins)
        for r, x in zip(full, processed, strict=True):
            if r["temperature"] == 0.0:
                top2 = np.sort(x)[-2:]
                margins.append(float((top2[1] - top2[0]) / max(abs(top2[1]), 1e-9)) / 1e-4)
            elif draws:
                u = float(row_uniforms([r["seed"]], [r["step"]])[0])
                margins.append(draw_margin(softmax(x), u))
        if not margins or min(margins) > 1.0:
            return logits, full
        seed += 7919
    raise RuntimeError(f"{case.name}: no seed found without a near-tie; change the case")


def _metadata(rows: list[dict[str, Any]], max_num_logprobs: int = -1) -> SamplingMetadata:
    def col(key: str, default: Any) -> list[Any]:
        return [r.get(key, default) for r in rows]

    return SamplingMetadata.from_lists(
        temperature=col("temperature", 1.0),
        top_k=col("top_k", 0),
        top_p=col("top_p", 1.0),
        min_p=col("min_p", 0.0),
        seeds=col("seed", 0),
        steps=col("step", 0),
        repetition_penalty=col("repetition_penalty", 1.0),
        presence_penalty=col("presence_penalty", 0.0),
        frequency_penalty=col("frequency_penalty", 0.0),
        prompt_token_ids=col("prompt", []),
        output_token_ids=col("output", []),
        vocab_size=VOCAB,
        max_num_logprobs=max_num_logprobs,
        banned_token_ids=col("banned", []),
    )


def _build_processed_logits() -> list[Case]:
    mixes = [
        ("temperature", True),
        ("top_k", False),
        ("top_p", True),
        ("min_p", False),
        ("penalties", True),
        ("mixed", True),
        ("banned", True),
    ]
    return [
        make_case("processed_logits", dtype, small=small, label=mix, B=len(_MIXES[mix]), V=VOCAB)
        for dtype in DTYPES
        for mix, small in mixes
    ]


def _check_processed_logits(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    logits, rows = _sampling_inputs(case, _MIXES[case.label])
    data = {"logits": logits, "md": _metadata(rows)}
    (out, mine), (ref, _) = _both(
        backend, reference, lambda side, d: side.processed_logits(d["logits"], d["md"]), data
    )
    if out.dtype != torch.float32:
        chk.fail(f"processed_logits must return float32, got {out.dtype}")
    chk.close("processed", out, ref)
    chk.exact("logits unchanged", mine["logits"], logits)


def _build_sample() -> list[Case]:
    configs = [("greedy", 5, True), ("greedy_penalties", 0, False), ("seeded", 3, True), ("banned", 2, True)]
    return [
        make_case("sample", dtype, small=small, label=mix, B=len(_MIXES[mix]), V=VOCAB, logprobs=k)
        for dtype in DTYPES
        for mix, k, small in configs
    ]


def _check_sample(case: Case, backend: Any, reference: Any, chk: Checker) -> None:
    # float32 cases compare random rows' tokens too, so their seeds also avoid near-boundary draws.
    exact_draws = case.dtype == torch.float32
    logits, rows = _sampling_inputs(case, _MIXES[case.label], draws=exact_draws)
    k = case.p["logprobs"]
    data = {"logits": logits, "md": _metadata(rows, k)}
    (out, _), (ref, _) = _both(backend, reference, lambda side, d: side.sample(d["logits"], d["md"]), data)
    tokens = out.sampled_token_ids.to("cpu")
    greedy = torch.tensor([r["temperature"] == 0.0 for r in rows])
    # Greedy rows: the same token as the reference, exactly.
    chk.exact("greedy tokens", tokens[greedy], ref.sampled_token_ids.to("cpu")[greedy])
    # Top logprobs come from the raw logits and are deterministic on both sides.
    if out.top_token_ids is None or out.top_logprobs is None or out.sampled_logprobs is None:
        chk.fail(f"max_num_logprobs={k} but the backend returned no logprobs")
        return
    chk.exact("top_token_ids", out.top_token_ids, ref.top_token_ids)
    chk.close("top_logprobs", out.top_logprobs, ref.top_logprobs)
    # The sampled token's logprob, whichever token the backend drew: log_softmax of the raw row.
    raw = to_numpy(logits)
    want = torch.tensor([log_softmax(raw[i])[int(tokens[i])] for i in range(len(rows))], dtype=torch.float64)
    chk.close("sampled_logprobs", out.sampled_logprobs, want)
    if bool(greedy.all()):
        return
    # Random rows: one host uniform per row from row_seed(seed, step) and the inverse CDF
    # (`xllm.hal.sampling_ops`), so on float32 the same seed draws the reference's very token.
    random_rows = (~greedy).nonzero().flatten().tolist()
    if exact_draws:
        chk.exact(
            "seeded random tokens == reference", tokens[~greedy], ref.sampled_token_ids.to("cpu")[~greedy]
        )
    processed = to_numpy(
        reference.processed_logits(*to_device((logits, _metadata(rows)), reference.device()))
    )
    for i in random_rows:
        if not np.isfinite(processed[i, int(tokens[i])]):
            chk.fail(f"row {i} drew token {int(tokens[i])}, which the reference's processing removed")
    again = backend.sample(*to_device((logits, _metadata(rows, k)), backend.device())).sampled_token_ids.to(
        "cpu"
    )
    chk.exact("same seed and step twice -> same tokens", again, tokens)
    for i in random_rows:
        alone = backend.sample(*to_device((logits[i : i + 1], _metadata(rows[i : i + 1])), backend.device()))
        chk.exact(
            f"row {i} alone == row {i} in the batch", alone.sampled_token_ids.to("cpu"), tokens[i : i + 1]
        )
    # Reproducible must not mean constant: one request over 32 steps at a flat temperature draws
    # more than one token (a sampler that took the argmax would pass every check above). With these
    # logits the top token's probability is about 0.06, so 32 equal draws cannot be a fluke.
    steps = 32
    row = {**rows[random_rows[0]], "temperature": 2.0, "top_k": 20, "top_p": 1.0, "min_p": 0.0}
    many = [{**row, "step": s} for s in range(steps)]
    many_logits = logits[random_rows[0] : random_rows[0] + 1].expand(steps, -1).contiguous()
    draws = backend.sample(*to_device((many_logits, _metadata(many)), backend.device())).sampled_token_ids
    allowed = np.isfinite(process_logits(to_numpy(many_logits[:1]), _metadata(many[:1]))[0])
    draws = draws.to("cpu").tolist()
    if len(set(draws)) < 2:
        chk.fail(f"32 steps of one seeded request all drew token {draws[0]}: the sampler is not random")
    if not all(allowed[t] for t in draws):
        chk.fail("a draw at top_k=20 fell outside the 20 most likely tokens")


# ---------------------------------------------------------------------------------- registration

register_kind(
    "rms_norm", _build_rms_norm, _check_rms_norm, description="RMSNorm, with and without fused residual"
)
register_kind(
    "rotary_embedding", _build_rotary, _check_rotary, description="RoPE, neox and gptj, partial rot_dim"
)
register_kind("embedding", _build_embedding, _check_embedding, description="token rows, exact")
register_kind("linear", _build_linear, _check_linear, description="x @ weight.T + bias")
register_kind("silu_and_mul", _build_silu, _check_silu, description="SwiGLU gate")
register_kind("gelu_and_mul", _build_gelu, _check_gelu, description="GeGLU gate, erf and tanh")
register_kind(
    "reshape_and_cache",
    _build_reshape_and_cache,
    _check_reshape_and_cache,
    description="paged KV write, exact, sentinel slots untouched",
)
register_kind(
    "attention", _build_attention, _check_attention, description="paged causal attention, mixed batches"
)
register_kind(
    "processed_logits",
    _build_processed_logits,
    _check_processed_logits,
    description="penalties, temperature, top-k, top-p, min-p",
)
register_kind(
    "sample",
    _build_sample,
    _check_sample,
    description="greedy tokens, logprobs, seeded draws (the reference's tokens on float32)",
)
