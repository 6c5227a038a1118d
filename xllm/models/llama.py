"""Llama (2, 3, 3.1, 3.2): pre-norm decoder, GQA attention with RoPE, SwiGLU MLP.

The reference layout the other families reuse. Per layer, from the checkpoint (q/k/v and
gate/up already fused by the loader):

    h = x + o_proj(attention(rope(q), rope(k), v))      q, k, v = split(qkv_proj(rmsnorm(x)))
    out = h + down_proj(silu(gate(rmsnorm(h))) * up(rmsnorm(h)))

Llama 3.1's long-context RoPE scaling ('llama3' rope type) lives in the cos/sin table only
(`layers.rope_inv_freq`). `attention_bias` puts a bias on all four attention projections.
"""

from __future__ import annotations

from xllm.models.causal_lm import CausalLM
from xllm.models.layers import Attention, DecoderLayer, GatedMLP, RMSNorm, Weights


class LlamaForCausalLM(CausalLM):
    def build_attention(self, w: Weights, prefix: str) -> Attention:
        cfg = self.config
        return Attention(
            self.backend,
            cfg,
            qkv_weight=w[prefix + "qkv_proj.weight"],
            o_weight=w[prefix + "o_proj.weight"],
            cos_sin_cache=self.cos_sin_cache,
            qkv_bias=w[prefix + "qkv_proj.bias"] if cfg.attention_bias else None,
            o_bias=w[prefix + "o_proj.bias"] if cfg.o_proj_bias else None,
        )

    def build_layer(self, w: Weights, index: int) -> DecoderLayer:
        p = f"model.layers.{index}."
        eps = self.config.rms_norm_eps
        return DecoderLayer(
            input_norm=RMSNorm(self.backend, w[p + "input_layernorm.weight"], eps),
            attn=self.build_attention(w, p + "self_attn."),
            post_attn_norm=RMSNorm(self.backend, w[p + "post_attention_layernorm.weight"], eps),
            mlp=GatedMLP(self.backend, w[p + "mlp.gate_up_proj.weight"], w[p + "mlp.down_proj.weight"]),
        )
