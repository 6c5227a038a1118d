"""How many KV-cache blocks an engine gets: the one place that turns memory into a block count.

Three rules, chosen by what the backend declares (never by a device name):
- an explicit ``kv_cache_memory`` is used as given, on every backend;
- a backend whose memory is the host's (`Capabilities.shares_host_memory`, the CPU) gets enough
  for every sequence slot at full length, capped at a quarter of free memory and 1 GiB, so the
  machine keeps room for everything else it runs;
- an accelerator with its own memory gets ``gpu_memory_utilization`` of the device's total,
  less what is in use after one profiling forward pass at the largest batch the scheduler can
  form (weights, activations, the allocator's cache), as vLLM sizes its cache.
One physical block more than the usable ones is always allocated: block 0, the null block that
padding rows may write (see `KVCacheManager`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from xllm.engine.config import EngineConfig
from xllm.hal import AttentionMetadata, Backend

logger = logging.getLogger("xllm.engine")

_HOST_KV_CAP_BYTES = 1 << 30
_HOST_FREE_FRACTION = 0.25
_GiB = float(1 << 30)


@dataclass(frozen=True, slots=True)
class KVCachePlan:
    num_blocks: int  # usable blocks, the null block not included
    bytes_per_block: int
    rule: str  # which rule sized it, for the log line

    @property
    def num_physical_blocks(self) -> int:
        return self.num_blocks + 1

    @property
    def kv_bytes(self) -> int:
        return self.num_physical_blocks * self.bytes_per_block


def bytes_per_block(model, block_size: int) -> int:
    c = model.config
    return 2 * c.num_layers * block_size * c.num_kv_heads * c.head_dim * model.dtype.itemsize


def plan_kv_cache(
    backend: Backend, model, config: EngineConfig, max_len: int, draft_model=None
) -> KVCachePlan:
    """`draft_model` (speculative decoding) keeps a cache of its own with as many blocks as the
    target's, one for each block of context: the budget is shared in proportion to their
    block sizes, and its weights are loaded already, so the profiling pass counts them."""
    per_block = bytes_per_block(model, config.block_size)
    if draft_model is not None:
        per_block += bytes_per_block(draft_model, config.block_size)
    if config.kv_cache_memory is not None:
        budget, rule = config.kv_cache_memory, "kv_cache_memory"
    elif backend.capabilities.shares_host_memory:
        free = backend.mem_info().free_bytes
        want = (config.max_num_seqs * -(-max_len // config.block_size) + 1) * per_block
        budget = max(min(want, int(free * _HOST_FREE_FRACTION), _HOST_KV_CAP_BYTES), 2 * per_block)
        rule = "host memory"
    else:
        budget = _profiled_budget(backend, model, config, max_len)
        rule = f"gpu_memory_utilization {config.gpu_memory_utilization:g}"
    num_blocks = budget // per_block - 1  # one physical block is the null block
    if num_blocks < 1:
        raise ValueError(
            f"the KV cache budget of {budget} B ({rule}) holds no usable block: one block needs "
            f"{per_block} B and one more is reserved as the null block; raise "
            f"{'kv_cache_memory' if config.kv_cache_memory is not None else 'gpu_memory_utilization'}"
        )
    return KVCachePlan(num_blocks=num_blocks, bytes_per_block=per_block, rule=rule)


def log_kv_cache_plan(plan: KVCachePlan, block_size: int, max_len: int) -> None:
    tokens = plan.num_blocks * block_size
    blocks_per_request = -(-max_len // block_size)
    logger.info(
        "KV cache (%s): %d blocks of %d tokens, %d tokens, %.2f GiB; maximum concurrency for "
        "%d tokens per request: %.2fx",
        plan.rule,
        plan.num_blocks,
        block_size,
        tokens,
        plan.kv_bytes / _GiB,
        max_len,
        plan.num_blocks / blocks_per_request,
    )


def _profiled_budget(backend: Backend, model, config: EngineConfig, max_len: int) -> int:
    """utilization * total - used after a forward pass of the largest batch (the pass's own
    temporary KV blocks are given back to the budget: the allocator keeps them cached for reuse)."""
    index = _device_index(model)
    total = backend.mem_info(index).total_bytes
    temp_kv_bytes = profile_forward(backend, model, config, max_len)
    backend.synchronize(index)
    info = backend.mem_info(index)
    used = info.total_bytes - info.free_bytes
    budget = int(config.gpu_memory_utilization * total) - used + temp_kv_bytes
    logger.info(
        "memory profile: %.2f GiB of %.2f GiB in use after a forward pass of %d tokens",
        used / _GiB,
        total / _GiB,
        min(config.max_num_batched_tokens, max_len * config.max_num_seqs),
    )
    if budget <= 0:
        raise ValueError(
            f"no device memory left for the KV cache: {used / _GiB:.2f} GiB of {total / _GiB:.2f} GiB "
            f"is in use after the model and a forward pass at the largest batch, more than "
            f"gpu_memory_utilization {config.gpu_memory_utilization:g} allows; raise "
            "gpu_memory_utilization, or lower max_num_batched_tokens / max_num_seqs"
        )
    return budget


def _device_index(model) -> int:
    """The device the model's weights are on (a tensor-parallel rank's is not device 0)."""
    device = getattr(model, "device", None)
    return (device.index or 0) if device is not None else 0


def profile_forward(backend: Backend, model, config: EngineConfig, max_len: int) -> int:
    """Runs the model once on the largest step the scheduler can build (max_num_batched_tokens
    tokens as full-length prefills, logits for up to max_num_seqs rows) over a temporary cache;
    returns the bytes that cache took."""
    num_tokens = max(1, min(config.max_num_batched_tokens, max_len * config.max_num_seqs))
    seq_len = min(num_tokens, max_len)
    lens = [seq_len] * (num_tokens // seq_len) + ([num_tokens % seq_len] if num_tokens % seq_len else [])
    bs = config.block_size
    blocks_per_seq = [-(-n // bs) for n in lens]
    num_blocks = sum(blocks_per_seq) + 1
    c = model.config
    index = _device_index(model)
    device = backend.device(index)
    caches = backend.allocate_kv_cache(
        c.num_layers, num_blocks, bs, c.num_kv_heads, c.head_dim, model.dtype, device_index=index
    )
    tables, slots, positions, starts, first = [], [], [], [0], 1
    for n, nb in zip(lens, blocks_per_seq, strict=True):
        row = list(range(first, first + nb))
        first += nb
        tables.append(row + [0] * (max(blocks_per_seq) - nb))
        slots.extend(row[p // bs] * bs + p % bs for p in range(n))
        positions.extend(range(n))
        starts.append(starts[-1] + n)
    metadata = AttentionMetadata(
        query_start_loc=torch.tensor(starts, dtype=torch.int32, device=device),
        seq_lens=torch.tensor(lens, dtype=torch.int32, device=device),
        block_tables=torch.tensor(tables, dtype=torch.int32, device=device),
        slot_mapping=torch.tensor(slots, dtype=torch.int64, device=device),
        max_query_len=max(lens),
        max_seq_len=max(lens),
        scale=model.attention_scale,
        sliding_window=model.sliding_window,
        query_start_loc_host=starts,
        seq_lens_host=lens,
    )
    input_ids = torch.zeros(num_tokens, dtype=torch.int64, device=device)
    with torch.inference_mode():
        hidden = model.forward(
            input_ids, torch.tensor(positions, dtype=torch.int64, device=device), caches, metadata
        )
        rows = torch.arange(num_tokens - min(config.max_num_seqs, num_tokens), num_tokens, device=device)
        model.compute_logits(hidden[rows])
    temp_bytes = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in caches)
    del caches, hidden
    return temp_bytes


__all__ = ["KVCachePlan", "bytes_per_block", "log_kv_cache_plan", "plan_kv_cache", "profile_forward"]
