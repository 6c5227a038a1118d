"""An independent NumPy (float64) implementation of every HAL op: the oracle's oracle.

The CPU backend defines xllm's numerics and every accelerator is compared against it; this module
checks the CPU backend itself. Each op is written again from the math in the `Backend` docstrings
and `AttentionMetadata` / `SamplingMetadata`, in float64 with plain NumPy and explicit loops over
sequences and tokens, so a reader can check it line by line. Torch appears only to convert
tensors in and out, to round a float64 value to a torch dtype where the contract says a value is
formed in the input dtype (e.g. the residual sum of `rms_norm`), and to draw the per-row uniforms
of `sample`: that random stream (`xllm.hal.sampling_ops.row_uniforms`) is part of the contract's
definition, not arithmetic under test.

Outputs are float64 tensors (token ids int64): the error the suite measures is then the backend's
own rounding, not the oracle's. `NumpyReference` has the public op names of `xllm.hal.Backend`,
so the conformance runner calls both sides the same way.
"""

from __future__ import annotations

import math
from typing import Literal

import numpy as np
import torch

from xllm.hal.backend import FLOAT_DTYPES, INT8_GROUP_SIZE, Capabilities
from xllm.hal.errors import NotSupportedError
from xllm.hal.metadata import AttentionMetadata, SampleOutput, SamplingMetadata
from xllm.hal.sampling_ops import row_uniforms

_erf = np.frompyfunc(math.erf, 1, 1)  # NumPy has no erf; math.erf per element is exact enough


def to_numpy(t: torch.Tensor) -> np.ndarray:
    """A float64 (or int64 for integer tensors) NumPy copy of a tensor on any device."""
    t = t.detach().to("cpu")
    if t.dtype.is_floating_point:
        return t.to(torch.float64).numpy().copy()
    return t.to(torch.int64).numpy().copy()


def round_to(a: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """Rounds float64 values to `dtype` (bfloat16 has no NumPy type, so torch does the cast)."""
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(dtype).to(torch.float64).numpy()


def _out(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax of a 1-D float64 vector; -inf entries get probability 0."""
    m = np.max(x)
    e = np.exp(x - m)
    return e / e.sum()


def log_softmax(x: np.ndarray) -> np.ndarray:
    m = np.max(x)
    return x - m - math.log(np.exp(x - m).sum())


class NumpyReference:
    """The HAL ops in float64 NumPy, with the same public method names as `Backend`."""

    name = "numpy"
    device_type = "cpu"
    # Every float dtype is accepted: inputs are converted to float64 exactly.
    capabilities = Capabilities(dtypes=FLOAT_DTYPES, notes=("float64 NumPy oracle",))

    def device(self, index: int = 0) -> torch.device:
        return torch.device("cpu")

    def synchronize(self, device_index: int = 0) -> None:
        """Nothing is asynchronous here; present so the runner can treat both sides alike."""

    # ------------------------------------------------------------------ normalisation

    def rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        h = to_numpy(x)
        if residual is not None:
            # The contract forms h = x + residual in x's dtype (as HF decoder layers do), and the
            # returned residual is that rounded sum, so the oracle rounds it the same way.
            h = round_to(h + to_numpy(residual), x.dtype)
        w = to_numpy(weight)
        mean_square = np.mean(h * h, axis=-1, keepdims=True)
        y = h / np.sqrt(mean_square + eps) * w
        return (_out(y), _out(h)) if residual is not None else _out(y)

    # ------------------------------------------------------------------ rotary embedding

    def rotary_embedding(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        neox_style: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        pos = to_numpy(positions)
        cache = to_numpy(cos_sin_cache)
        half = cache.shape[1] // 2
        out = []
        for t_in in (q, k):
            x = to_numpy(t_in)  # [T, H, head_dim]
            y = x.copy()  # dims past rot_dim pass through unchanged
            for t in range(x.shape[0]):
                cos = cache[pos[t], :half]
                sin = cache[pos[t], half:]
                for h in range(x.shape[1]):
                    if neox_style:
                        # Pair i with i + rot_dim/2 (rotate_half of GPT-NeoX / Llama).
                        x1 = x[t, h, :half]
                        x2 = x[t, h, half : 2 * half]
                        y[t, h, :half] = x1 * cos - x2 * sin
                        y[t, h, half : 2 * half] = x2 * cos + x1 * sin
                    else:
                        # GPT-J: pair 2i with 2i + 1.
                        x1 = x[t, h, 0 : 2 * half : 2]
                        x2 = x[t, h, 1 : 2 * half : 2]
                        y[t, h, 0 : 2 * half : 2] = x1 * cos - x2 * sin
                        y[t, h, 1 : 2 * half : 2] = x2 * cos + x1 * sin
            out.append(_out(y))
        return out[0], out[1]

    # ------------------------------------------------------------------ gated activations

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        out = to_numpy(x) @ to_numpy(weight).T
        if bias is not None:
            out = out + to_numpy(bias)
        return _out(out)

    def linear_int8(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None = None,
        group_size: int = INT8_GROUP_SIZE,
    ) -> torch.Tensor:
        q = to_numpy(qweight)
        out_features, in_features = q.shape
        groups = q.reshape(out_features, in_features // group_size, group_size)
        w = (groups * to_numpy(scales)[:, :, None]).reshape(out_features, in_features)
        # The contract forms W in float32 (exact here: |q| <= 128 times a float32 scale rounds
        # once) and rounds it to x's dtype before the product.
        w = round_to(round_to(w, torch.float32), x.dtype)
        out = to_numpy(x) @ w.T
        if bias is not None:
            out = out + to_numpy(bias)
        return _out(out)

    def embedding(self, input_ids: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return _out(to_numpy(weight)[to_numpy(input_ids)])

    def silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        a = to_numpy(x)
        d = a.shape[-1] // 2
        gate, up = a[..., :d], a[..., d:]
        return _out(gate / (1.0 + np.exp(-gate)) * up)

    def gelu_and_mul(self, x: torch.Tensor, approximate: Literal["none", "tanh"] = "none") -> torch.Tensor:
        a = to_numpy(x)
        d = a.shape[-1] // 2
        gate, up = a[..., :d], a[..., d:]
        if approximate == "tanh":
            inner = math.sqrt(2.0 / math.pi) * (gate + 0.044715 * gate**3)
            gelu = 0.5 * gate * (1.0 + np.tanh(inner))
        else:
            gelu = 0.5 * gate * (1.0 + _erf(gate / math.sqrt(2.0)).astype(np.float64))
        return _out(gelu * up)

    # ------------------------------------------------------------------ paged KV cache

    def reshape_and_cache(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        block_size = k_cache.shape[1]
        slots = to_numpy(slot_mapping)
        for src, cache in ((k, k_cache), (v, v_cache)):
            values = to_numpy(src)
            c = to_numpy(cache)  # float64 holds every value of the cache dtype exactly
            for t, slot in enumerate(slots):
                if slot < 0:  # padding token: writes nothing
                    continue
                block, offset = divmod(int(slot), block_size)
                c[block, offset] = values[t]
            cache.copy_(torch.from_numpy(c).to(cache.dtype))  # exact: the values came from this dtype

    # ------------------------------------------------------------------ attention

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        md = metadata
        qa = to_numpy(q)  # [T, Hq, D]
        kc = to_numpy(k_cache)  # [num_blocks, block_size, Hkv, D]
        vc = to_numpy(v_cache)
        starts = to_numpy(md.query_start_loc)
        seq_lens = to_numpy(md.seq_lens)
        tables = to_numpy(md.block_tables)
        block_size = kc.shape[1]
        num_q_heads, num_kv_heads = qa.shape[1], kc.shape[2]
        group = num_q_heads // num_kv_heads
        out = np.zeros_like(qa)
        for i in range(len(seq_lens)):
            seq_len = int(seq_lens[i])
            q_start, q_end = int(starts[i]), int(starts[i + 1])
            query_len = q_end - q_start
            # Gather the sequence's whole context from its blocks: token t is in block
            # block_tables[i, t // block_size] at offset t % block_size.
            keys = np.stack([kc[tables[i, t // block_size], t % block_size] for t in range(seq_len)])
            values = np.stack([vc[tables[i, t // block_size], t % block_size] for t in range(seq_len)])
            for j in range(query_len):
                pos = seq_len - query_len + j  # queries are the sequence's last query_len tokens
                lo = 0 if md.sliding_window is None else max(0, pos - md.sliding_window + 1)
                for h in range(num_q_heads):
                    kv = h // group
                    scores = keys[lo : pos + 1, kv] @ qa[q_start + j, h] * md.scale
                    p = softmax(scores)
                    out[q_start + j, h] = p @ values[lo : pos + 1, kv]
        return _out(out)

    # ------------------------------------------------------------------ sampling

    def processed_logits(self, logits: torch.Tensor, sampling: SamplingMetadata) -> torch.Tensor:
        rows = process_logits(to_numpy(logits), sampling)
        return _out(rows)

    def sample(self, logits: torch.Tensor, sampling: SamplingMetadata) -> SampleOutput:
        raw = to_numpy(logits)
        processed = process_logits(raw, sampling)
        temperature = to_numpy(sampling.temperature)
        seeds, steps = to_numpy(sampling.seeds), to_numpy(sampling.steps)
        tokens = np.zeros(raw.shape[0], dtype=np.int64)
        for i in range(raw.shape[0]):
            if temperature[i] <= 0:
                tokens[i] = int(np.argmax(processed[i]))
            else:
                u = float(row_uniforms([int(seeds[i])], [int(steps[i])])[0])
                tokens[i] = draw_token(softmax(processed[i]), u)
        if sampling.max_num_logprobs < 0:
            return SampleOutput(sampled_token_ids=_out(tokens))
        k = min(sampling.max_num_logprobs, raw.shape[1])
        # Logprobs come from the raw logits, before any processing (OpenAI / vLLM semantics).
        logprobs = np.stack([log_softmax(raw[i]) for i in range(raw.shape[0])])
        top_ids = np.argsort(-logprobs, axis=-1, kind="stable")[:, :k]
        return SampleOutput(
            sampled_token_ids=_out(tokens),
            sampled_logprobs=_out(logprobs[np.arange(raw.shape[0]), tokens]),
            top_logprobs=_out(np.take_along_axis(logprobs, top_ids, axis=-1)),
            top_token_ids=_out(top_ids.astype(np.int64)),
        )

    # ------------------------------------------------------------------ not ops

    def create_graph_runner(self, *args: object, **kwargs: object) -> None:
        raise NotSupportedError(
            "the NumPy reference has no graphs; graph cases compare a backend with itself"
        )

    def create_xtensor(self, *args: object, **kwargs: object) -> None:
        raise NotSupportedError("the NumPy reference has no device memory")


# float32 cumulative sums over a ~1k vocabulary drift by ~1e-6, and probabilities carry ~1e-6
# relative error; these are 10x that (see `process_logits` and `draw_margin`).
TOP_P_SAFE_ABS = 1e-5
MIN_P_SAFE_REL = 1e-4
DRAW_SAFE_ABS = 1e-5


def draw_token(probs: np.ndarray, u: float) -> int:
    """The contract's draw: the first token whose cumulative probability exceeds ``u * total``
    (a zero-probability token never does, since it repeats the previous sum)."""
    cdf = np.cumsum(probs)
    return min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), len(probs) - 1)


def draw_margin(probs: np.ndarray, u: float) -> float:
    """How far ``u * total`` sits from the nearest cumulative-probability boundary, as a multiple
    of `DRAW_SAFE_ABS`: below 1, float32 rounding could move the draw to a neighbouring token."""
    cdf = np.cumsum(probs)
    return float(np.min(np.abs(cdf - u * cdf[-1]))) / DRAW_SAFE_ABS


def process_logits(
    raw: np.ndarray, sampling: SamplingMetadata, margins: list[float] | None = None
) -> np.ndarray:
    """The processed logits [B, V] in float64, row by row, in the contract's order:
    banned tokens -> penalties -> temperature -> top-k -> top-p -> min-p; greedy rows
    (temperature 0) get the ban and the penalties only. Removed tokens are -inf.

    When `margins` is a list, the distance of every top-p and min-p cut to the nearest token is
    appended to it, as a multiple of the distance float32 rounding could cover (`TOP_P_SAFE_ABS`
    of cumulative probability, `MIN_P_SAFE_REL` of the cut): the case generator keeps only inputs
    where every entry exceeds 1, so a backend is never blamed for a legitimate rounding flip.
    """
    sm = sampling
    out = raw.astype(np.float64).copy()
    vocab_size = out.shape[1]
    temperature = to_numpy(sm.temperature)
    top_k, top_p, min_p = to_numpy(sm.top_k), to_numpy(sm.top_p), to_numpy(sm.min_p)
    rep, pres, freq = (
        to_numpy(sm.repetition_penalty),
        to_numpy(sm.presence_penalty),
        to_numpy(sm.frequency_penalty),
    )
    prompts = to_numpy(sm.prompt_token_ids) if sm.prompt_token_ids is not None else None
    outputs = to_numpy(sm.output_token_ids) if sm.output_token_ids is not None else None
    if sm.banned is not None:
        for row, tok in to_numpy(sm.banned).tolist():
            out[int(row), int(tok)] = -np.inf
    for i in range(out.shape[0]):
        x = out[i]
        # Token histories are padded with vocab_size, an id no row holds.
        prompt_ids = [int(t) for t in prompts[i] if t < vocab_size] if prompts is not None else []
        output_ids = [int(t) for t in outputs[i] if t < vocab_size] if outputs is not None else []
        # Repetition penalty (CTRL; HF and vLLM): every token seen in prompt or output has a
        # positive logit divided by the penalty and a negative one multiplied by it.
        if rep[i] != 1.0:
            for tok in set(prompt_ids) | set(output_ids):
                x[tok] = x[tok] / rep[i] if x[tok] > 0 else x[tok] * rep[i]
        # Frequency and presence penalties (OpenAI semantics) count output tokens only.
        counts = np.zeros(vocab_size)
        for tok in output_ids:
            counts[tok] += 1
        x -= freq[i] * counts + pres[i] * (counts > 0)
        if temperature[i] <= 0:
            continue  # greedy: penalties only
        x /= temperature[i]
        if 0 < top_k[i] < vocab_size:
            # Keep the k largest, and anything tied with the k-th (HF's TopKLogitsWarper).
            kth = np.sort(x)[::-1][int(top_k[i]) - 1]
            x[x < kth] = -np.inf
        if top_p[i] < 1.0:
            # Keep the smallest set of most likely tokens whose mass reaches top_p: going up from
            # the least likely, drop tokens while the dropped mass stays <= 1 - top_p.
            probs = softmax(x)
            order = np.argsort(probs, kind="stable")
            cum = np.cumsum(probs[order])
            drop = cum <= 1.0 - top_p[i]
            drop[-1] = False  # the most likely token always stays
            if margins is not None:
                live = probs[order] > 0
                margins.append(float(np.min(np.abs(cum[live] - (1.0 - top_p[i])))) / TOP_P_SAFE_ABS)
            x[order[drop]] = -np.inf
        if min_p[i] > 0.0:
            # Drop tokens less likely than min_p times the most likely one.
            probs = softmax(x)
            cut = min_p[i] * probs.max()
            if margins is not None:
                live = probs > 0
                margins.append(float(np.min(np.abs(probs[live] - cut)) / cut) / MIN_P_SAFE_REL)
            x[probs < cut] = -np.inf
    return out
