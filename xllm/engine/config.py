"""`EngineConfig`: every knob of an engine instance, validated once at construction."""

from __future__ import annotations

import re

from pydantic import BaseModel, ConfigDict, Field, field_validator

_UNITS = {
    "": 1,
    "b": 1,
    "k": 2**10,
    "kb": 10**3,
    "kib": 2**10,
    "m": 2**20,
    "mb": 10**6,
    "mib": 2**20,
    "g": 2**30,
    "gb": 10**9,
    "gib": 2**30,
}


def parse_bytes(value: int | float | str) -> int:
    """Accepts 1073741824, "1GiB", "512MiB", "2g" ..."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"cannot parse a byte size from {value!r} (examples: 1073741824, 512MiB, 2GiB)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


class EngineConfig(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = None  # a Hugging Face checkpoint directory; None = the embedded default model
    backend: str | None = None  # None: $XLLM_BACKEND or the first available backend
    dtype: str = "auto"
    max_model_len: int | None = Field(None, ge=1)
    block_size: int = Field(16, ge=1, le=1024)
    kv_cache_memory: int | None = Field(None, ge=1)  # bytes for the KV cache; None = sized automatically
    # On an accelerator with its own memory: the fraction of it the engine may fill (weights,
    # activations and KV cache together), as vLLM's --gpu-memory-utilization.
    gpu_memory_utilization: float = Field(0.9, gt=0.0, le=1.0)
    enable_prefix_caching: bool = True
    seed: int = 0
    max_num_seqs: int = Field(256, ge=1)
    max_num_batched_tokens: int = Field(4096, ge=1)
    use_graphs: bool = True
    capture_sizes: list[int] | None = None
    tokenizer: str | None = None  # defaults to the model directory
    backend_options: dict[str, object] = Field(default_factory=dict)
    # A failing model step fails only its own requests; this many failures in a row (or one that
    # the backend calls fatal) mean the device is broken, and the engine stops (EngineDeadError).
    max_consecutive_step_failures: int = Field(3, ge=1)

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _parse_kv_bytes(cls, value: object) -> object:
        return None if value is None else parse_bytes(value)  # type: ignore[arg-type]

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        if value not in ("auto", "float32", "bfloat16", "float16", "fp32", "bf16", "fp16", "half", "float"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {value!r}")
        return value
