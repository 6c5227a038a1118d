"""`DraftModelProposer`: speculative decoding's guesses from a second, smaller model.

A draft checkpoint with the target's vocabulary guesses the next k tokens greedily; the engine
appends them to the target sequence and verifies them exactly as it verifies n-gram guesses
(`spec_decode`), so the output stays plain greedy decoding whatever the draft says. The draft
runs beside the target in the same process and on the same backend, with its own paged KV cache,
its own `KVCacheManager` and its own `ModelRunner` (whose decode steps replay graphs). Each
target sequence has a shadow `Sequence` here: its tokens are the target's context followed by the
last guesses, its block table and `num_computed_tokens` say how much of that the draft's KV
holds. A guess the target rejected leaves KV that the next catch-up overwrites.
"""

from __future__ import annotations

from xllm.engine.kv_cache_manager import KVCacheManager
from xllm.engine.model_runner import ModelRunner
from xllm.engine.outputs import RequestMetrics
from xllm.engine.sampling_params import SamplingParams
from xllm.engine.scheduler import ScheduledSequence
from xllm.engine.sequence import Request, Sequence, SequenceStatus
from xllm.hal import Backend

# Rejected guesses sit at the end of a shadow's tokens: the prefix before this many last tokens
# is compared in one C-level list comparison, only the tail token by token.
_TAIL_SCAN = 64


def load_draft_model(model_path: str, backend: Backend, dtype, target_vocab_size: int):
    """The draft checkpoint's model, its vocabulary checked against the target's before the
    weights load: a mismatch is a configuration error, found at once."""
    from xllm.models import ModelConfig, load_model

    config = ModelConfig.from_pretrained(model_path)
    if config.vocab_size != target_vocab_size:
        raise ValueError(
            f"speculative_model {model_path!r} has vocab_size {config.vocab_size} but the target "
            f"model has {target_vocab_size}; a draft model must share the target's vocabulary"
        )
    return load_model(model_path, backend, dtype=dtype)


class DraftModelProposer:
    def __init__(
        self,
        backend: Backend,
        model,
        *,
        block_size: int,
        num_blocks: int,
        max_model_len: int,
        max_num_seqs: int,
        max_num_batched_tokens: int | None = None,
        use_graphs: bool = True,
    ) -> None:
        # The catch-up step's token budget (the engine's step budget): a long prompt is caught up
        # over several proposals, as the target's chunked prefill does.
        self.max_num_batched_tokens = max_num_batched_tokens
        if model.config.max_position_embeddings < max_model_len:
            raise ValueError(
                f"the draft model has max_position_embeddings {model.config.max_position_embeddings}, "
                f"less than max_model_len {max_model_len}; lower max_model_len or choose a draft "
                "with a longer context"
            )
        self.model = model
        mc = self.model.config
        self.max_model_len = max_model_len
        self.kv_cache = KVCacheManager(num_blocks, block_size, enable_prefix_caching=False)
        self.kv_caches = backend.allocate_kv_cache(
            mc.num_layers,
            self.kv_cache.num_physical_blocks,  # usable blocks plus the null block 0
            block_size,
            mc.num_kv_heads,
            mc.head_dim,
            self.model.dtype,
        )
        self.runner = ModelRunner(
            backend,
            self.model,
            self.kv_caches,
            block_size,
            max_model_len,
            max_num_seqs,
            use_graphs=use_graphs,
        )
        # One greedy request stands behind every shadow: the sampler reads only its params.
        self._request = Request(
            request_id="draft",
            prompt=None,
            prompt_token_ids=[],
            params=SamplingParams(temperature=0.0, max_tokens=None),
            priority=0,
            metrics=RequestMetrics(arrival_time=0.0),
        )
        self._shadows: dict[int, Sequence] = {}  # target seq_id -> shadow

    def propose(self, seqs: list[Sequence], ks: list[int]) -> list[list[int]]:
        """Up to ``ks[i]`` greedy draft tokens following each ``seqs[i].token_ids`` (whose last
        token the target has not computed yet); [] for a sequence whose draft blocks do not fit."""
        drafts: list[list[int]] = [[] for _ in seqs]
        # (scheduled shadow, tokens wanted, index in seqs) of the sequences still guessing
        batch: list[tuple[ScheduledSequence, int, int]] = []
        budget = self.max_num_batched_tokens
        for i, (seq, k) in enumerate(zip(seqs, ks, strict=True)):
            # Never compute a position >= max_model_len: guess j comes from position len - 1 + j.
            k = min(k, self.max_model_len - seq.num_tokens + 1)
            if k <= 0 or budget == 0:
                continue
            shadow = self._sync(seq)
            chunk = shadow.num_tokens - shadow.num_computed_tokens
            # A catch-up past what is left of the budget computes its first part only and
            # guesses nothing this time.
            part = chunk if budget is None else min(chunk, budget)
            if part < chunk:
                k = 0
            # All blocks of the k steps at once (all or nothing), so later steps cannot fail.
            if not self.kv_cache.allocate(shadow, part + max(k - 1, 0)):
                self.release(seq)
                continue
            if budget is not None:
                budget -= part
            batch.append((ScheduledSequence(shadow, part), k, i))
        # Step 1 catches every shadow up (its whole prompt the first time) and guesses once;
        # steps 2..k are single-token decodes, the batch shrinking as sequences have enough.
        while batch:
            result = self.runner.execute([item for item, _, _ in batch])
            survivors: list[tuple[ScheduledSequence, int, int]] = []
            for (item, k, i), sampled in zip(batch, result.sampled, strict=True):
                shadow = item.seq
                shadow.num_computed_tokens += item.num_new_tokens
                if sampled is None:  # a catch-up cut by the budget: it went part of the way
                    continue
                shadow.token_ids.append(sampled.token_id)
                drafts[i].append(sampled.token_id)
                if len(drafts[i]) < k:
                    survivors.append((ScheduledSequence(shadow, 1), k, i))
            batch = survivors
        return drafts

    def release(self, seq: Sequence) -> None:
        """Frees the shadow of a target sequence that finished or was aborted (idempotent)."""
        shadow = self._shadows.pop(seq.seq_id, None)
        if shadow is not None:
            self.kv_cache.free(shadow)

    def _sync(self, seq: Sequence) -> Sequence:
        """The shadow of `seq`, holding the target's tokens, its KV kept for their longest common
        prefix with what the draft computed (rejected guesses are recomputed over)."""
        shadow = self._shadows.get(seq.seq_id)
        if shadow is None:
            shadow = Sequence(
                seq_id=seq.seq_id,
                request=self._request,
                index=0,
                token_ids=[],
                num_prompt_tokens=seq.num_prompt_tokens,
                seed=0,
                status=SequenceStatus.RUNNING,
            )
            self._shadows[seq.seq_id] = shadow
        target = seq.token_ids
        # At least the last token is computed here: its logits give the first guess.
        keep = _common_prefix_len(shadow.token_ids, target, min(shadow.num_computed_tokens, len(target) - 1))
        shadow.num_computed_tokens = keep
        del shadow.token_ids[keep:]
        shadow.token_ids += target[keep:]
        return shadow


def _common_prefix_len(a: list[int], b: list[int], limit: int) -> int:
    """Length of the common prefix of a and b, at most `limit`."""
    start = max(0, limit - _TAIL_SCAN)
    if a[:start] != b[:start]:
        start = 0
    n = start
    while n < limit and a[n] == b[n]:
        n += 1
    return n
