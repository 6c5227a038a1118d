"""Tensor-parallel shards of the family models (Megatron-LM's layout), over a HAL `Communicator`.

Rank r of N holds:

* column-parallel q/k/v and gate/up: rows ``[r * out / N, (r + 1) * out / N)`` of each, so the rank
  owns whole heads (``num_heads / N`` query heads, ``num_kv_heads / N`` KV heads) and 1/N of the
  MLP's intermediate features; nothing is exchanged until the projection back;
* row-parallel o and down: the matching input columns; each rank's product is a partial sum, and
  one all-reduce per sublayer (attention, MLP) completes it; an o bias is added after it, once;
* vocab-parallel embedding and output head: ``ceil(vocab / N)`` rows each (the last rank's padded
  with zeros); the lookup zeroes ids outside the rank's range and all-reduces, the head
  all-gathers the ranks' logits and drops the padding columns, so the logits have the full vocab.

Everything else (norms, Qwen3's per-head q/k norms, the RoPE table) is replicated. Loading reads
only the rank's slice of each tensor from the safetensors files (`safe_open(...).get_slice`), so
no rank holds a full copy of a sharded matrix. Families need no change: `tensor_parallel_class`
derives a subclass that wraps the sublayers and overrides the embedding and the head.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from xllm.hal.backend import Backend
from xllm.hal.comm import Communicator
from xllm.models.causal_lm import CausalLM
from xllm.models.config import ModelConfig
from xllm.models.layers import DecoderLayer, Weights, project

_COLUMN = ("q_proj.", "k_proj.", "v_proj.", "gate_proj.", "up_proj.")  # split the output rows
_ROW = ("o_proj.weight", "down_proj.weight")  # split the input columns
_VOCAB = ("model.embed_tokens.weight", "lm_head.weight")


class TensorParallelError(ValueError):
    """The model cannot be split over the requested number of ranks."""


def check_shardable(config: ModelConfig, world_size: int) -> None:
    """Raises a one-line `TensorParallelError` unless every split dimension divides evenly."""
    if world_size == 1:
        return
    dims = {
        "attention heads": config.num_heads,
        "KV heads": config.num_kv_heads,
        "MLP intermediate features": config.intermediate_size,
    }
    bad = [f"{n} {what}" for what, n in dims.items() if n % world_size]
    if bad:
        common = math.gcd(config.num_heads, config.num_kv_heads, config.intermediate_size)
        divisors = [d for d in range(1, common + 1) if common % d == 0]
        raise TensorParallelError(
            f"tensor_parallel_size {world_size} does not divide the model's {', '.join(bad)}; "
            f"choose one of {', '.join(map(str, divisors))}"
        )


def shard_config(config: ModelConfig, world_size: int) -> ModelConfig:
    """The config one rank's layers see: its share of the heads and MLP (vocab stays whole,
    because the logits are gathered to the full vocabulary)."""
    check_shardable(config, world_size)
    return dataclasses.replace(
        config,
        num_heads=config.num_heads // world_size,
        num_kv_heads=config.num_kv_heads // world_size,
        intermediate_size=config.intermediate_size // world_size,
    )


@dataclass(frozen=True, slots=True)
class VocabShard:
    start: int  # first vocabulary id of the rank
    rows: int  # rows per rank, ceil(vocab / N): the last rank's tail is zero padding

    @classmethod
    def of(cls, vocab_size: int, rank: int, world_size: int) -> VocabShard:
        rows = -(-vocab_size // world_size)
        return cls(rank * rows, rows)


def _read_slice(handle: Any, name: str, rank: int, world_size: int, vocab: VocabShard) -> torch.Tensor:
    """Only the rank's part of tensor `name` (whole for replicated tensors)."""
    piece = handle.get_slice(name)
    shape = piece.get_shape()
    if name in _VOCAB:
        stop = min(vocab.start + vocab.rows, shape[0])
        t = piece[vocab.start : stop] if stop > vocab.start else piece[0:0]
        if t.shape[0] < vocab.rows:  # the padding rows: zero logits, never looked up
            t = torch.cat([t, t.new_zeros(vocab.rows - t.shape[0], *shape[1:])])
        return t
    leaf = name.rsplit(".", 2)
    proj = leaf[-2] + "." if len(leaf) == 3 else ""
    if proj in _COLUMN:
        n = shape[0] // world_size
        return piece[rank * n : (rank + 1) * n]
    if any(name.endswith(suffix) for suffix in _ROW):
        n = shape[1] // world_size
        return piece[:, rank * n : (rank + 1) * n]
    return handle.get_tensor(name)


def read_shard_tensors(
    files: list[Path], config: ModelConfig, dtype: torch.dtype, rank: int, world_size: int
) -> dict[str, torch.Tensor]:
    """Rank `rank`'s slices of every tensor in the files, floating ones cast to `dtype`."""
    from safetensors import safe_open

    vocab = VocabShard.of(config.vocab_size, rank, world_size)
    tensors: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(str(f), framework="pt", device="cpu") as handle:
            for name in handle.keys():
                t = _read_slice(handle, name, rank, world_size, vocab)
                tensors[name] = t.to(dtype) if t.is_floating_point() else t
    return tensors


@dataclass(slots=True)
class RowParallel:
    """A sublayer whose last projection is row-parallel: all-reduce its partial sums, then add
    the bias (held here, not in the projection, so it is added once and not N times)."""

    inner: Any  # Attention or GatedMLP
    comm: Communicator
    bias: torch.Tensor | None = None

    def __call__(self, *args: Any) -> torch.Tensor:
        out = self.comm.all_reduce(self.inner(*args))
        return out if self.bias is None else out + self.bias


class TensorParallelMixin:
    """Put before a family class: builds rank `comm.rank`'s shard from weights read by
    `read_shard_tensors` and a config from `shard_config`."""

    comm: Communicator
    vocab: VocabShard
    config: ModelConfig
    backend: Backend
    embed_tokens: torch.Tensor
    lm_head: Any
    layers: list[DecoderLayer]
    norm: Any

    def build_layer(self, weights: Weights, index: int) -> DecoderLayer:
        layer = super().build_layer(weights, index)  # type: ignore[misc]
        o_bias, layer.attn.o_bias = layer.attn.o_bias, None
        layer.attn = RowParallel(layer.attn, self.comm, o_bias)
        layer.mlp = RowParallel(layer.mlp, self.comm)
        return layer

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.vocab.start
        outside = (local < 0) | (local >= self.vocab.rows)
        hidden = F.embedding(local.masked_fill(outside, 0), self.embed_tokens)
        # Exactly one rank contributes each row, the others add zeros: the sum is exact.
        return self.comm.all_reduce(hidden.masked_fill_(outside.unsqueeze(-1), 0))

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        local = project(self.backend, hidden, self.lm_head).float()  # [n, vocab.rows]
        n, world = local.shape[0], self.comm.world_size
        gathered = self.comm.all_gather(local)  # [world * n, rows], rank-major
        logits = gathered.view(world, n, self.vocab.rows).permute(1, 0, 2).reshape(n, -1)
        return logits[:, : self.config.vocab_size].contiguous()


_CLASSES: dict[type[CausalLM], type[CausalLM]] = {}


def tensor_parallel_class(family_class: type[CausalLM]) -> type[CausalLM]:
    """The family class with `TensorParallelMixin` in front (one derived class per family)."""
    if family_class not in _CLASSES:
        name = f"TensorParallel{family_class.__name__}"
        _CLASSES[family_class] = type(name, (TensorParallelMixin, family_class), {})
    return _CLASSES[family_class]


def build_shard(
    family_class: type[CausalLM],
    config: ModelConfig,
    backend: Backend,
    weights: Weights,
    device: torch.device,
    comm: Communicator,
) -> CausalLM:
    """Rank ``comm.rank``'s model; `config` is the full model's (the shard's is derived here)."""
    cls = tensor_parallel_class(family_class)
    model = cls.__new__(cls)
    # Set before CausalLM.__init__, which calls build_layer.
    model.comm = comm  # type: ignore[attr-defined]
    model.vocab = VocabShard.of(config.vocab_size, comm.rank, comm.world_size)  # type: ignore[attr-defined]
    model.__init__(shard_config(config, comm.world_size), backend, weights, device)  # type: ignore[misc]
    return model


def load_model_shard(
    path: str | Path,
    backend: Backend,
    comm: Communicator,
    dtype: str | torch.dtype = "auto",
    device_index: int = 0,
    quantization: str = "none",
) -> CausalLM:
    """`load_model` for rank ``comm.rank`` of ``comm.world_size``: reads, fuses and (with
    ``quantization="int8"``) quantises only that rank's slices."""
    from xllm.models import loader

    path = loader.check_model_dir(path)
    config = ModelConfig.from_pretrained(path)
    check_shardable(config, comm.world_size)
    target = loader.resolve_dtype(dtype, config)
    if target not in backend.capabilities.dtypes:
        raise ValueError(f"backend {backend.name!r} does not support dtype {target}")
    source = f"the checkpoint in {str(path)!r}"
    files = loader.weight_files(path)
    tensors = read_shard_tensors(files, config, target, comm.rank, comm.world_size)
    local = shard_config(config, comm.world_size)
    tensors = loader.fuse_projections(tensors, local, source)
    if quantization == "int8":
        tensors = loader.quantize_projections(tensors, local)
    elif quantization != "none":
        raise ValueError(f"unsupported quantization {quantization!r}")
    device = backend.device(device_index)
    tensors = backend.place_weights(tensors, device_index)
    family = loader.MODEL_CLASSES[config.family]
    return build_shard(family, config, backend, Weights(tensors, source), device, comm)
