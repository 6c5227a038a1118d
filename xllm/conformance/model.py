"""The "model" conformance kind: whole-model greedy decoding on a backend, checked end to end.

The op cases check each HAL op alone; this kind checks that they add up. For each model family
and dtype it builds a tiny checkpoint with `xllm.models.make_model` (once per process), decodes a
ragged batch of token-id prompts greedily through the real engine (`LLM(...).generate`, EOS
ignored, logprobs on) on the backend under test, and compares with the same decode on the
reference: another backend through the same engine (``--against cpu``), or Hugging Face
transformers (``--against numpy``: NumPy has no model, so transformers is the whole-model oracle).
The prompts cross KV-block borders (block size 16) while prefilling and while decoding, one is
longer than Mistral's 32-token sliding window, and a 32-token step budget makes the engine prefill
in chunks beside other sequences' decodes, so paging, the window, RoPE positions and mixed
prefill/decode attention all matter.

Rules (thresholds and tolerances in `xllm.hal.conformance.compare`): in float32 the tokens must be
identical and the chosen tokens' logprobs agree by NMSE. In bfloat16 / float16 a conforming
backend may round differently, so sequences may part where the reference itself nearly tied.
Tokens must agree up to the first divergence, which is accepted only at such a near tie: the
reference rates the backend's token less than `MODEL_NEAR_TIE_NATS` below its own choice (so its
top-2 gap there is below that too). The chosen tokens' logprobs up to and including the
divergence are compared by NMSE, and nothing after it (the contexts differ from there on).

Layering: this module sits above the engine (it drives `LLM`, handing it the very backend
instance under test) and registers the kind with the HAL's conformance registry, which never
imports the engine or the models (see `xllm.conformance`). Registration is explicit and scoped
(`model_kind_registered()`), as ``xllm conformance`` does around its run, so the kind does not
leak into other users of the registry in the same process.
"""

from __future__ import annotations

import atexit
import functools
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from xllm.hal import Backend
from xllm.hal.conformance import NumpyReference
from xllm.hal.conformance.cases import Case, dtype_name, make_case, register_kind, unregister_kind
from xllm.hal.conformance.compare import MODEL_NEAR_TIE_NATS, Checker

KIND = "model"
FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral")
# Prompt lengths: inside one block; just past a block border; one short of the second border, so
# decoding crosses it (and the window); longer than Mistral's tiny sliding window of 32.
PROMPT_LENS: tuple[int, ...] = (3, 17, 31, 40)
NEW_TOKENS = 12
BLOCK_SIZE = 16
# A step budget smaller than the prompts: the engine prefills them in chunks beside other
# sequences' decode tokens, so attention also sees mixed batches and chunks that start mid-prompt
# over cached context (the paths a serving engine takes), not only whole-prompt prefills.
STEP_TOKEN_BUDGET = 32
TOP_LOGPROBS = 5  # enough to see the reference's runner-up at a near tie
# make_model puts its special tokens at ids 0..4; prompts use ordinary tokens only.
NUM_SPECIAL_IDS = 5


def build_model_cases() -> list[Case]:
    """One case per family and dtype; the float32 Llama one is in the small set (it is the only
    one cheap enough for the Triton interpreter)."""
    return [
        make_case(
            KIND,
            dtype,
            small=(family == "llama" and dtype == torch.float32),
            family=family,
            lens=PROMPT_LENS,
            new=NEW_TOKENS,
        )
        for family in FAMILIES
        for dtype in (torch.float32, torch.bfloat16, torch.float16)
    ]


# ---------------------------------------------------------------------------------- inputs


_checkpoint_root: Path | None = None


@functools.cache
def tiny_checkpoint(family: str) -> Path:
    """The family's tiny checkpoint, written once per process into a temporary directory that is
    removed at exit (make_model is deterministic, so every process sees the same weights)."""
    from xllm.models import make_model

    global _checkpoint_root
    if _checkpoint_root is None:
        _checkpoint_root = Path(tempfile.mkdtemp(prefix="xllm-conformance-models-"))
        atexit.register(shutil.rmtree, _checkpoint_root, ignore_errors=True)
    return make_model(_checkpoint_root / family, family, "tiny")


def model_prompts(case: Case, vocab_size: int) -> list[list[int]]:
    """Seeded token-id prompts of the case's lengths (same for every dtype of a family)."""
    rng = random.Random(case.seed)
    return [[rng.randrange(NUM_SPECIAL_IDS, vocab_size) for _ in range(n)] for n in case.p["lens"]]


# ---------------------------------------------------------------------------------- decoding


@dataclass(frozen=True, slots=True)
class Decode:
    """One prompt's greedy continuation: the chosen tokens, their logprobs, and per step the
    top logprobs (token id -> logprob, best first) for the near-tie rule."""

    tokens: list[int]
    logprobs: list[float]
    top: list[dict[int, float]]

    def gap(self, step: int) -> float:
        """Logprob of the best token minus the runner-up's at `step` (inf if only one is known)."""
        values = sorted(self.top[step].values(), reverse=True)
        return values[0] - values[1] if len(values) > 1 else float("inf")


def decode_with_engine(
    backend: Backend, path: Path, dtype: torch.dtype, prompts: list[list[int]], max_tokens: int
) -> list[Decode]:
    """Greedy decode of `prompts` through xllm's engine on `backend`: this very instance, with
    whatever options it was built with (``interpret=True`` for ``--interpret``, a test double)."""
    from xllm.engine.llm import LLM
    from xllm.engine.sampling_params import SamplingParams
    from xllm.models import ModelConfig

    config = ModelConfig.from_pretrained(path)
    max_len = max(len(p) for p in prompts) + max_tokens
    blocks = len(prompts) * -(-max_len // BLOCK_SIZE) + 4
    block_bytes = 2 * config.num_layers * BLOCK_SIZE * config.num_kv_heads * config.head_dim * dtype.itemsize
    llm = LLM(
        model=str(path),
        backend=backend,
        dtype=dtype_name(dtype),
        block_size=BLOCK_SIZE,
        max_model_len=max_len,
        kv_cache_memory=blocks * block_bytes,  # a few blocks, not a share of device memory
        max_num_seqs=len(prompts),
        max_num_batched_tokens=STEP_TOKEN_BUDGET,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True, logprobs=TOP_LOGPROBS)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    del llm  # frees the KV cache before the next engine is built
    decodes = []
    for out in outputs:
        comp = out.outputs[0]
        entries = comp.logprobs or []
        top = [{t: lp.logprob for t, lp in sorted(e.items(), key=lambda kv: -kv[1].logprob)} for e in entries]
        # strict=True: a backend that lost logprobs is reported by compare_decodes, not here.
        chosen = [e[t].logprob for e, t in zip(entries, comp.token_ids, strict=True)]
        decodes.append(Decode(list(comp.token_ids), chosen, top))
    return decodes


@functools.cache
def _decode_with_transformers_cached(
    path: str, dtype: torch.dtype, prompts: tuple[tuple[int, ...], ...], max_tokens: int
) -> tuple[Decode, ...]:
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.utils import logging as hf_logging

    bar_was_on = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a "Loading weights" bar per case would break the table
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    finally:
        if bar_was_on:
            hf_logging.enable_progress_bar()
    model.eval()
    # generate() merges the checkpoint's generation_config; drop its EOS so nothing stops early.
    model.generation_config.eos_token_id = None
    config = GenerationConfig(
        do_sample=False,
        max_new_tokens=max_tokens,
        eos_token_id=None,
        pad_token_id=0,
        output_logits=True,
        return_dict_in_generate=True,
    )
    decodes = []
    with torch.inference_mode():
        for prompt in prompts:  # one at a time: padding cannot disturb the reference
            ids = torch.tensor([prompt])
            out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
            new = out.sequences[0, len(prompt) :].tolist()
            chosen, top = [], []
            for step, token in zip(out.logits, new, strict=True):
                # Raw logits (before any processor), as xllm's logprobs are.
                lp = torch.log_softmax(step[0].float(), dim=-1)
                values, ids_ = lp.topk(TOP_LOGPROBS)
                chosen.append(float(lp[token]))
                top.append(dict(zip(ids_.tolist(), values.tolist(), strict=True)))
            decodes.append(Decode(new, chosen, top))
    return tuple(decodes)


def decode_with_transformers(
    path: Path, dtype: torch.dtype, prompts: list[list[int]], max_tokens: int
) -> list[Decode]:
    """Greedy decode with Hugging Face transformers on the CPU in `dtype` (cached per process:
    every backend checked against it sees the same reference)."""
    key = tuple(tuple(p) for p in prompts)
    return list(_decode_with_transformers_cached(str(path), dtype, key, max_tokens))


# ---------------------------------------------------------------------------------- the check


def compare_decodes(
    got: list[Decode], want: list[Decode], dtype: torch.dtype, max_tokens: int, checker: Checker
) -> None:
    """Records the comparison of the backend's decodes (`got`) with the reference's on `checker`."""
    tie_nats = MODEL_NEAR_TIE_NATS.get(dtype, 0.0)
    got_lp: list[float] = []
    want_lp: list[float] = []
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        if len(w.tokens) != max_tokens:
            checker.fail(f"prompt {i}: the reference produced {len(w.tokens)} tokens, not {max_tokens}")
            continue
        if len(g.tokens) != max_tokens or len(g.logprobs) != max_tokens:
            checker.fail(
                f"prompt {i}: {len(g.tokens)} tokens / {len(g.logprobs)} logprobs, not {max_tokens} "
                "(EOS ignored, so every prompt must run to max_tokens)"
            )
            continue
        diverged = next((s for s in range(max_tokens) if g.tokens[s] != w.tokens[s]), None)
        last = max_tokens if diverged is None else diverged + 1
        # Up to and including a divergence both sides chose their own best token, so the chosen
        # logprobs stay comparable; after it the contexts differ and nothing is.
        got_lp += g.logprobs[:last]
        want_lp += w.logprobs[:last]
        if diverged is None:
            continue
        s = diverged
        token, ref_token = g.tokens[s], w.tokens[s]
        # How far below its own choice the reference rates the backend's token (>= its top-2
        # gap, equal when the backend took the runner-up); None: not even in its top-k.
        alt = w.top[s].get(token)
        margin = None if alt is None else w.logprobs[s] - alt
        where = f"prompt {i} step {s}: token {token} != reference {ref_token}"
        if tie_nats == 0.0:
            checker.fail(
                f"{where} (reference top-2 gap {w.gap(s):.3g}; {dtype_name(dtype)} allows no divergence)"
            )
        elif margin is None:
            checker.fail(f"{where}, which is not in the reference's top {len(w.top[s])}")
        elif margin >= tie_nats:
            checker.fail(
                f"{where} where the reference's gap {margin:.3g} >= near-tie tolerance {tie_nats:g} nats"
            )
    if got_lp:
        checker.close("chosen-token logprobs", torch.tensor(got_lp), torch.tensor(want_lp))


def check_model_case(case: Case, backend: Any, reference: Any, checker: Checker) -> None:
    from xllm.models import ModelConfig

    assert case.dtype is not None
    path = tiny_checkpoint(case.p["family"])
    prompts = model_prompts(case, ModelConfig.from_pretrained(path).vocab_size)
    max_tokens = case.p["new"]
    got = decode_with_engine(backend, path, case.dtype, prompts, max_tokens)
    if isinstance(reference, NumpyReference):
        want = decode_with_transformers(path, case.dtype, prompts, max_tokens)
    else:
        want = decode_with_engine(reference, path, case.dtype, prompts, max_tokens)
    compare_decodes(got, want, case.dtype, max_tokens, checker)


@contextmanager
def model_kind_registered() -> Iterator[None]:
    """Registers the "model" kind for the duration (``xllm conformance`` wraps its run in this)."""
    register_kind(
        KIND,
        build_model_cases,
        check_model_case,
        uses_reference=True,
        description="whole-model greedy decode through the engine vs the reference backend or transformers",
    )
    try:
        yield
    finally:
        unregister_kind(KIND)
