"""`ModelConfig`: the part of a Hugging Face ``config.json`` that xllm's model files read.

A checkpoint's config comes in two dialects: transformers 4 (``torch_dtype``, top-level
``rope_theta`` and ``rope_scaling``) and transformers 5 (``dtype``, ``rope_parameters`` holding
``rope_theta`` and the scaling keys). `ModelConfig.from_hf_dict` reads both into one flat,
typed record so the family modules never touch raw JSON. Family quirks that change the maths
(Qwen2's always-on q/k/v bias, Qwen3's per-head q/k norm, Mistral's sliding window) are resolved
here, once, so each family file stays a plain transcription of its architecture.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from xllm.dtypes import torch_dtype

SUPPORTED_FAMILIES: tuple[str, ...] = ("llama", "qwen2", "qwen3", "mistral")

# Rope types whose inverse frequencies `layers.rope_inv_freq` knows how to compute.
SUPPORTED_ROPE_TYPES: tuple[str, ...] = ("default", "linear", "llama3")


class ModelConfigError(ValueError):
    """A config.json that xllm cannot run: unknown family, unsupported rope type, missing field."""


def parse_dtype(name: str | torch.dtype | None) -> torch.dtype | None:
    """'bfloat16' / 'torch.bfloat16' / torch.bfloat16 -> torch.bfloat16; None stays None.

    The names are `xllm.dtypes.DTYPE_ALIASES`, the table the engine and the CLI read too."""
    if name is None or isinstance(name, torch.dtype):
        return name
    try:
        return torch_dtype(name)
    except ValueError as exc:
        raise ModelConfigError(str(exc)) from None


@dataclass(slots=True)
class ModelConfig:
    """Architecture of one decoder-only checkpoint, family-normalised."""

    family: str  # one of SUPPORTED_FAMILIES, from config.json's model_type
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None  # None for plain RoPE; else has "rope_type" plus its keys
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    sliding_window: int | None = None  # same window on every layer, or None (see _sliding_window)
    attention_bias: bool = False  # bias on the q/k/v projections
    o_proj_bias: bool = False  # bias on the output projection (Llama/Qwen3 attention_bias does both)
    qk_norm: bool = False  # Qwen3: RMSNorm over each head of q and k before RoPE
    dtype: torch.dtype | None = None  # the checkpoint's stored dtype, when config.json says
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    pad_token_id: int | None = None

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def attention_scale(self) -> float:
        return self.head_dim**-0.5

    @classmethod
    def from_hf_dict(cls, raw: dict[str, Any]) -> ModelConfig:
        family = raw.get("model_type")
        if family not in SUPPORTED_FAMILIES:
            raise ModelConfigError(
                f"unsupported model_type {family!r} in config.json; xllm supports: {', '.join(SUPPORTED_FAMILIES)}"
            )

        def need(key: str) -> Any:
            if raw.get(key) is None:
                raise ModelConfigError(f"config.json for a {family} model lacks required field {key!r}")
            return raw[key]

        hidden = int(need("hidden_size"))
        heads = int(need("num_attention_heads"))
        num_layers = int(need("num_hidden_layers"))
        # Qwen2 hard-codes bias=True on q/k/v (its config has no attention_bias key); Llama and
        # Qwen3 put `attention_bias` on all four projections; Mistral has no biases at all.
        bias = bool(raw.get("attention_bias", False))
        qkv_bias = {"qwen2": True, "mistral": False}.get(family, bias)
        o_bias = bias if family in ("llama", "qwen3") else False
        if raw.get("mlp_bias"):
            raise ModelConfigError("config.json sets mlp_bias=true, which xllm's gated MLP does not support")
        if raw.get("hidden_act", "silu") != "silu":
            raise ModelConfigError(
                f"unsupported hidden_act {raw['hidden_act']!r}; xllm's {family} MLP uses silu"
            )
        rope_theta, rope_scaling = _rope(raw)
        eos = raw.get("eos_token_id")
        return cls(
            family=family,
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_layers=num_layers,
            num_heads=heads,
            num_kv_heads=int(raw.get("num_key_value_heads") or heads),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_position_embeddings=int(raw.get("max_position_embeddings", 2048)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            sliding_window=_sliding_window(raw, family, num_layers),
            attention_bias=qkv_bias,
            o_proj_bias=o_bias,
            qk_norm=family == "qwen3",
            dtype=parse_dtype(raw.get("dtype") or raw.get("torch_dtype")),
            bos_token_id=raw.get("bos_token_id"),
            eos_token_ids=[] if eos is None else [int(e) for e in (eos if isinstance(eos, list) else [eos])],
            pad_token_id=raw.get("pad_token_id"),
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ModelConfig:
        """Reads ``path/config.json`` (path may also be the config file itself)."""
        path = Path(path)
        file = path if path.is_file() else path / "config.json"
        if not file.is_file():
            raise FileNotFoundError(f"no config.json in {path}; is this a Hugging Face model directory?")
        try:
            raw = json.loads(file.read_text())
        except json.JSONDecodeError as exc:
            raise ModelConfigError(f"{file} is not valid JSON: {exc}") from exc
        return cls.from_hf_dict(raw)


def _rope(raw: dict[str, Any]) -> tuple[float, dict[str, Any] | None]:
    """(rope_theta, scaling or None) from either dialect.

    transformers 5 writes ``rope_parameters = {"rope_type", "rope_theta", ...}``; transformers 4
    writes top-level ``rope_theta`` and ``rope_scaling = {"type" | "rope_type", ...}``.
    """
    params = dict(raw.get("rope_parameters") or {})
    legacy = dict(raw.get("rope_scaling") or {})
    merged = {**legacy, **params}
    theta = float(merged.pop("rope_theta", raw.get("rope_theta", 10000.0)))
    rope_type = merged.pop("rope_type", None) or merged.pop("type", None) or "default"
    merged.pop("type", None)
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelConfigError(
            f"unsupported rope type {rope_type!r}; xllm supports: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if rope_type == "default":
        return theta, None
    if rope_type == "llama3":
        merged.setdefault("original_max_position_embeddings", raw.get("max_position_embeddings"))
        missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in merged]
        if missing:
            raise ModelConfigError(f"llama3 rope scaling lacks {', '.join(missing)}")
    if rope_type == "linear" and "factor" not in merged:
        raise ModelConfigError("linear rope scaling lacks 'factor'")
    return theta, {"rope_type": rope_type, **merged}


def _sliding_window(raw: dict[str, Any], family: str, num_layers: int) -> int | None:
    """One window for every layer, or None; mixed full/sliding layers are refused.

    Mistral applies ``sliding_window`` (when set) on every layer. Qwen2/Qwen3 apply it only when
    ``use_sliding_window`` is true, and then only on layers ``>= max_window_layers`` (or as
    ``layer_types`` says). `AttentionMetadata` carries a single window per batch, so a model
    whose layers differ cannot be run faithfully and is rejected rather than silently changed.
    """
    window = raw.get("sliding_window")
    if family == "llama":
        return None
    if family == "mistral":
        return int(window) if window else None
    if not raw.get("use_sliding_window") or not window:
        return None
    layer_types = raw.get("layer_types") or [
        "sliding_attention" if i >= raw.get("max_window_layers", 28) else "full_attention"
        for i in range(num_layers)
    ]
    kinds = set(layer_types)
    if kinds == {"full_attention"}:
        return None
    if kinds == {"sliding_attention"}:
        return int(window)
    raise ModelConfigError(
        f"{family} config mixes full and sliding-window attention layers (max_window_layers="
        f"{raw.get('max_window_layers')}); xllm supports one window for all layers"
    )


def load_generation_config(path: str | Path) -> dict[str, Any]:
    """Sampling defaults from ``generation_config.json`` ({} when the file is absent).

    Returns only the keys the engine understands (temperature, top_p, top_k, min_p,
    repetition_penalty, max_new_tokens, do_sample) plus ``eos_token_ids`` as a list.
    """
    file = Path(path) / "generation_config.json"
    if not file.is_file():
        return {}
    raw = json.loads(file.read_text())
    keys = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "max_new_tokens", "do_sample")
    out: dict[str, Any] = {k: raw[k] for k in keys if raw.get(k) is not None}
    eos = raw.get("eos_token_id")
    if eos is not None:
        out["eos_token_ids"] = [int(e) for e in (eos if isinstance(eos, list) else [eos])]
    if raw.get("bos_token_id") is not None:
        out["bos_token_id"] = int(raw["bos_token_id"])
    return out
