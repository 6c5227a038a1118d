"""Building blocks shared by the decoder families: RMSNorm, RoPE tables, attention, gated MLP.

Every numeric kernel goes through the HAL `Backend` passed in (``backend.rms_norm``,
``backend.rotary_embedding``, ``backend.reshape_and_cache``, ``backend.attention``,
``backend.silu_and_mul``, ``backend.linear`` for the projections, ``backend.linear_int8`` for
those quantised at load); the only torch ops used directly are views and embedding lookups, which
every torch device runs. Weights are plain tensors (or `Int8Weight`) already fused the way the
kernels want them (q/k/v in one matrix, gate/up in one), so a forward step issues one GEMM per
projection group.

Weights come in with Hugging Face names via the `Weights` helper; see `loader.py` for the fusing.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from xllm.hal.backend import INT8_GROUP_SIZE, Backend, quantize_int8
from xllm.hal.metadata import AttentionMetadata
from xllm.models.config import ModelConfig


class MissingWeightError(KeyError):
    """A tensor the architecture needs is absent from the checkpoint."""

    def __str__(self) -> str:  # KeyError would print the message with quotes
        return str(self.args[0])


class Weights:
    """Name -> tensor view of a checkpoint that reports missing names clearly."""

    def __init__(self, tensors: Mapping[str, torch.Tensor | Int8Weight], source: str = "checkpoint") -> None:
        self.tensors = tensors
        self.source = source

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def __getitem__(self, name: str) -> torch.Tensor:
        try:
            return self.tensors[name]
        except KeyError:
            raise MissingWeightError(f"tensor {name!r} is missing from {self.source}") from None

    def get(self, name: str) -> torch.Tensor | None:
        return self.tensors.get(name)


# ---------------------------------------------------------------------------------------- int8


@dataclass(frozen=True, slots=True)
class Int8Weight:
    """A projection weight stored as int8 with per-group float32 scales (`quantize_int8`); the
    layers hand it to ``backend.linear_int8`` where a float weight goes to ``backend.linear``."""

    qweight: torch.Tensor  # int8 [out, in]
    scales: torch.Tensor  # float32 [out, in / group_size]
    group_size: int = INT8_GROUP_SIZE

    @classmethod
    def quantize(cls, weight: torch.Tensor, group_size: int = INT8_GROUP_SIZE) -> Int8Weight:
        qweight, scales = quantize_int8(weight, group_size)
        return cls(qweight, scales, group_size)

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    def to(self, device: torch.device | str) -> Int8Weight:
        return Int8Weight(self.qweight.to(device), self.scales.to(device), self.group_size)


ProjWeight = torch.Tensor | Int8Weight


def project(
    backend: Backend, x: torch.Tensor, weight: ProjWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ weight.T + bias`` through the backend op that matches how the weight is stored."""
    if isinstance(weight, Int8Weight):
        return backend.linear_int8(x, weight.qweight, weight.scales, bias, weight.group_size)
    return backend.linear(x, weight, bias)


# ---------------------------------------------------------------------------------------- RoPE


def rope_inv_freq(rot_dim: int, theta: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [rot_dim / 2], float32, computed as transformers' rope init functions do.

    The same expressions in the same order (``_compute_default_rope_parameters``,
    ``_compute_linear_scaling_rope_parameters``, ``_compute_llama3_parameters``) so the float32
    table matches Hugging Face bit for bit, not merely to rounding.
    """
    inv_freq = 1.0 / (
        theta ** (torch.arange(0, rot_dim, 2, dtype=torch.int64).to(dtype=torch.float) / rot_dim)
    )
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        # Llama 3.1: keep high frequencies, divide low ones by `factor`, blend in between.
        factor = scaling["factor"]
        low_freq_factor = scaling["low_freq_factor"]
        high_freq_factor = scaling["high_freq_factor"]
        old_context_len = scaling["original_max_position_embeddings"]
        low_freq_wavelen = old_context_len / low_freq_factor
        high_freq_wavelen = old_context_len / high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        inv_freq_llama = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
        smooth_factor = (old_context_len / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
        smoothed_inv_freq = (1 - smooth_factor) * inv_freq_llama / factor + smooth_factor * inv_freq_llama
        is_medium_freq = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
        return torch.where(is_medium_freq, smoothed_inv_freq, inv_freq_llama)
    raise ValueError(f"unsupported rope type {rope_type!r}")


def build_cos_sin_cache(
    rot_dim: int,
    max_positions: int,
    theta: float,
    scaling: dict[str, Any] | None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """float32 [max_positions, rot_dim]: cos(p * inv_freq) in the first half, sin in the second.

    That is vLLM's layout, which `Backend.rotary_embedding` reads. The angle is formed as
    ``position.float() * inv_freq`` in float32, as HF's rotary forward does, so cos/sin agree.
    """
    inv_freq = rope_inv_freq(rot_dim, theta, scaling)
    positions = torch.arange(max_positions, dtype=torch.int64).float()
    freqs = positions[:, None] * inv_freq[None, :]
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(device)


# ---------------------------------------------------------------------------------------- layers


class RMSNorm:
    def __init__(self, backend: Backend, weight: torch.Tensor, eps: float) -> None:
        self.backend = backend
        self.weight = weight
        self.eps = eps

    def __call__(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``, or with `residual` the pair ``(norm(x + residual), x + residual)``."""
        return self.backend.rms_norm(x, self.weight, self.eps, residual)


class Attention:
    """GQA self-attention over the paged KV cache: fused qkv GEMM, optional per-head q/k norm
    (Qwen3), RoPE, cache write, paged attention, output projection."""

    def __init__(
        self,
        backend: Backend,
        config: ModelConfig,
        qkv_weight: ProjWeight,  # [q_size + 2 * kv_size, hidden]
        o_weight: ProjWeight,  # [hidden, q_size]
        cos_sin_cache: torch.Tensor,  # shared by all layers
        qkv_bias: torch.Tensor | None = None,
        o_bias: torch.Tensor | None = None,
        q_norm: RMSNorm | None = None,
        k_norm: RMSNorm | None = None,
    ) -> None:
        self.backend = backend
        self.num_heads = config.num_heads
        self.num_kv_heads = config.num_kv_heads
        self.head_dim = config.head_dim
        self.q_size = config.q_size
        self.kv_size = config.kv_size
        self.qkv_weight, self.qkv_bias = qkv_weight, qkv_bias
        self.o_weight, self.o_bias = o_weight, o_bias
        self.cos_sin_cache = cos_sin_cache
        self.q_norm, self.k_norm = q_norm, k_norm

    def __call__(
        self,
        positions: torch.Tensor,
        x: torch.Tensor,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        md: AttentionMetadata,
    ) -> torch.Tensor:
        t = x.shape[0]
        qkv = project(self.backend, x, self.qkv_weight, self.qkv_bias)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.q_norm is not None:
            # Qwen3 normalises each head vector (over head_dim) before rotating it.
            q = self.q_norm(q)
            k = self.k_norm(k)
        q, k = self.backend.rotary_embedding(positions, q, k, self.cos_sin_cache)
        k_cache, v_cache = kv_cache
        self.backend.reshape_and_cache(k, v, k_cache, v_cache, md.slot_mapping)
        out = self.backend.attention(q, k, v, k_cache, v_cache, md)
        return project(self.backend, out.reshape(t, self.q_size), self.o_weight, self.o_bias)


class GatedMLP:
    """SwiGLU MLP: ``down(silu(gate(x)) * up(x))`` with gate and up fused in one [2*inter, hidden] GEMM."""

    def __init__(self, backend: Backend, gate_up_weight: ProjWeight, down_weight: ProjWeight) -> None:
        self.backend = backend
        self.gate_up_weight = gate_up_weight
        self.down_weight = down_weight

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = project(self.backend, x, self.gate_up_weight)
        return project(self.backend, self.backend.silu_and_mul(gate_up), self.down_weight)


class DecoderLayer:
    """Pre-norm block: ``h += attn(norm(h)); h += mlp(norm(h))`` with the residual add fused into the norms."""

    def __init__(self, input_norm: RMSNorm, attn: Attention, post_attn_norm: RMSNorm, mlp: GatedMLP) -> None:
        self.input_norm = input_norm
        self.attn = attn
        self.post_attn_norm = post_attn_norm
        self.mlp = mlp

    def __call__(
        self,
        positions: torch.Tensor,
        hidden: torch.Tensor,
        residual: torch.Tensor | None,
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        md: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        # vLLM's residual threading: `hidden` is the last sublayer's output, `residual` the running
        # sum before it; the fused norm adds them, so each block costs two norm calls, no extra adds.
        if residual is None:
            residual = hidden
            hidden = self.input_norm(hidden)
        else:
            hidden, residual = self.input_norm(hidden, residual)
        hidden = self.attn(positions, hidden, kv_cache, md)
        hidden, residual = self.post_attn_norm(hidden, residual)
        return self.mlp(hidden), residual
