"""Mistral: the Llama layout with sliding-window attention on every layer.

A query at position p attends to keys in (p - sliding_window, p]. The window is a property of the
whole batch (`AttentionMetadata.sliding_window`, set by the runner from `model.sliding_window`),
so the layers themselves are exactly Llama's; Mistral has no attention or MLP biases.
"""

from __future__ import annotations

from xllm.models.llama import LlamaForCausalLM


class MistralForCausalLM(LlamaForCausalLM):
    pass
