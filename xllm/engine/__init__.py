"""The device-agnostic engine: scheduler, KV-cache manager, model runner, LLM and AsyncLLM.

It imports `xllm.hal` and `xllm.models` only; the backend comes from the registry.
"""
