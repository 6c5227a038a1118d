"""xllm: an LLM inference engine whose engine and server run on any accelerator through one HAL.

The engine's public names (`LLM`, `SamplingParams`, `AsyncLLM`) are resolved lazily so that
`import xllm` stays cheap for tools that only need the HAL (``xllm backends``, conformance).
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_LAZY = {
    "LLM": "xllm.engine.llm",
    "SamplingParams": "xllm.engine.sampling_params",
    "AsyncLLM": "xllm.engine.async_llm",
    "RequestOutput": "xllm.engine.outputs",
    "CompletionOutput": "xllm.engine.outputs",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xllm' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = ["__version__", *_LAZY]
