"""Qwen3 (dense): the Llama layout plus RMSNorm over each head of q and k before RoPE.

``q = rope(rmsnorm_head(q_proj(x)))``, the same for k, with one [head_dim] weight shared by all
heads of a kind (Qwen3Attention.q_norm / k_norm). Qwen3 gives ``head_dim`` explicitly (128 for
every size), so ``num_heads * head_dim`` need not equal ``hidden_size``.
"""

from __future__ import annotations

from xllm.models.layers import Attention, RMSNorm, Weights
from xllm.models.llama import LlamaForCausalLM


class Qwen3ForCausalLM(LlamaForCausalLM):
    def build_attention(self, w: Weights, prefix: str) -> Attention:
        attn = super().build_attention(w, prefix)
        eps = self.config.rms_norm_eps
        attn.q_norm = RMSNorm(self.backend, w[prefix + "q_norm.weight"], eps)
        attn.k_norm = RMSNorm(self.backend, w[prefix + "k_norm.weight"], eps)
        return attn
