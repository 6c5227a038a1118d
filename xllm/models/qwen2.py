"""Qwen2 / Qwen2.5: the Llama layout with a bias on the q, k and v projections (never on o_proj).

Qwen2's config has no ``attention_bias`` key because its modeling code hard-codes the q/k/v
biases; `ModelConfig` records that as ``attention_bias=True``, so the Llama layer builder loads
them. Small Qwen2 models tie the output head to the embedding (``tie_word_embeddings``), handled
by `CausalLM`. Sliding-window attention is used only when ``use_sliding_window`` is set (see
`config._sliding_window`); released Qwen2.5 checkpoints leave it off.
"""

from __future__ import annotations

from xllm.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    pass
