"""The device-agnostic engine: scheduler, KV-cache manager, model runner, LLM and AsyncLLM.

It imports `xllm.hal`, `xllm.models` and the leaf `xllm.dtypes` only; the backend comes from the
registry by name, or is a `xllm.hal.Backend` instance the caller passes in.
"""
