"""`CausalLM`: the decoder-only model shell every family shares (embed, layers, final norm, head).

A family module subclasses it and says how to build one decoder layer from the checkpoint's
tensors (`build_layer`); everything else — the RoPE table, the residual threading through the
layers, the tied or separate output head — is the same for Llama, Qwen2, Qwen3 and Mistral.

The model does not build `AttentionMetadata`: the engine's runner does, reading
`model.attention_scale` and `model.sliding_window` from here, because the same batch
description serves every layer and the runner owns the KV-cache block tables.
"""

from __future__ import annotations

import torch

from xllm.hal.backend import Backend
from xllm.hal.metadata import AttentionMetadata
from xllm.models.config import ModelConfig
from xllm.models.layers import DecoderLayer, RMSNorm, Weights, build_cos_sin_cache, project


class CausalLM:
    """forward(input_ids [T], positions [T], kv_caches, attn_metadata) -> hidden [T, hidden]."""

    def __init__(self, config: ModelConfig, backend: Backend, weights: Weights, device: torch.device) -> None:
        self.config = config
        self.backend = backend
        self.device = device
        # One float32 table for all layers; positions index its rows.
        self.cos_sin_cache = build_cos_sin_cache(
            config.head_dim, config.max_position_embeddings, config.rope_theta, config.rope_scaling, device
        )
        self.embed_tokens = weights["model.embed_tokens.weight"]  # [vocab, hidden]
        self.layers: list[DecoderLayer] = [self.build_layer(weights, i) for i in range(config.num_layers)]
        self.norm = RMSNorm(backend, weights["model.norm.weight"], config.rms_norm_eps)
        # Tied checkpoints reuse the embedding matrix as the output head (no copy).
        self.lm_head = self.embed_tokens if config.tie_word_embeddings else weights["lm_head.weight"]

    def build_layer(self, weights: Weights, index: int) -> DecoderLayer:
        raise NotImplementedError

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.dtype

    @property
    def attention_scale(self) -> float:
        """Softmax scale for `AttentionMetadata.scale` (1/sqrt(head_dim) for all four families)."""
        return self.config.attention_scale

    @property
    def sliding_window(self) -> int | None:
        """For `AttentionMetadata.sliding_window`: a query at p sees keys in (p - window, p]."""
        return self.config.sliding_window

    @torch.no_grad()
    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        attn_metadata: AttentionMetadata,
    ) -> torch.Tensor:
        assert len(kv_caches) == len(self.layers), f"need one (k, v) cache per layer, got {len(kv_caches)}"
        hidden = self.embed(input_ids)
        residual: torch.Tensor | None = None
        for layer, kv_cache in zip(self.layers, kv_caches, strict=True):
            hidden, residual = layer(positions, hidden, residual, kv_cache, attn_metadata)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    __call__ = forward

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[T] token ids -> [T, hidden] (tensor parallelism overrides it: a vocabulary slice per rank)."""
        return self.backend.embedding(input_ids, self.embed_tokens)

    @torch.no_grad()
    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """[N, hidden] -> float32 [N, vocab]; the runner passes only the rows it samples from."""
        return project(self.backend, hidden, self.lm_head).float()
