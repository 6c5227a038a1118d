"""`EngineConfig`: every knob of an engine instance, validated once at construction.

It imports no torch (nor anything else heavy): the CLI reads it to build its engine flags.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator, model_validator

from xllm.dtypes import canonical_dtype_name

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
    """Every knob of one engine. Each field's description is also its ``--flag``'s help:
    `xllm.cli.engine_args` derives the engine flags of ``xllm serve`` / ``generate`` / ``bench``
    from this class, so a field added here reaches the command line with no other change."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())

    model: str | None = Field(
        None, description="Hugging Face checkpoint directory (default: the embedded default model)"
    )
    # A registry name, or a `xllm.hal.Backend` the caller built (a test double, a backend with
    # options the registry does not know). Typed Any so that this module, which the CLI reads to
    # build its parser, does not import torch; `_check_backend` does the type check.
    backend: Any = Field(
        None,
        description="backend name (see `xllm backends`) or, from Python, a Backend instance "
        "(default: $XLLM_BACKEND, else the first available backend)",
    )
    dtype: str = Field(
        "auto",
        description="weight and activation dtype; auto: the checkpoint's where the backend computes "
        "it natively, else float32",
    )
    quantization: Literal["none", "int8"] = Field(
        "none",
        description="weight quantization at load: none, or int8 (int8 weights with one float scale per 32 "
        "input features, llama.cpp's Q8_0) for the attention and MLP projections and an untied "
        "output head",
    )
    max_model_len: int | None = Field(
        None,
        ge=1,
        description="longest context, prompt plus output (default: the model's, capped by the KV cache)",
    )
    block_size: int = Field(16, ge=1, le=1024, description="tokens per KV-cache block")
    kv_cache_memory: int | None = Field(
        None, ge=1, description="bytes for the KV cache, e.g. 2GiB (default: sized automatically)"
    )
    # On an accelerator with its own memory: the fraction of it the engine may fill (weights,
    # activations and KV cache together), as vLLM's --gpu-memory-utilization.
    gpu_memory_utilization: float = Field(
        0.9,
        gt=0.0,
        le=1.0,
        description="on an accelerator, the fraction of device memory for weights, activations and "
        "the KV cache, sized after a profiling pass at the largest batch (ignored on the CPU and "
        "when kv_cache_memory is given)",
    )
    enable_prefix_caching: bool = Field(True, description="reuse the KV blocks of shared prompt prefixes")
    # Off: a prompt is prefilled in one step or waits, so no prompt may exceed the step's token
    # budget (checked by `_chunked_prefill_fits` and, for a derived max_model_len, by the engine).
    enable_chunked_prefill: bool = Field(
        True,
        description="split prompts longer than a step's token budget over several steps, beside "
        "other sequences' decodes (off: max_num_batched_tokens must be >= max_model_len)",
    )
    seed: int = Field(0, description="seed of the per-request sampling seeds of unseeded requests")
    max_num_seqs: int = Field(256, ge=1, description="most sequences in one step")
    max_num_batched_tokens: int = Field(
        4096, ge=1, description="most tokens in one step (the step's token budget)"
    )
    use_graphs: bool = Field(
        True, description="replay captured graphs for decode steps instead of running eagerly"
    )
    capture_sizes: list[int] | None = Field(
        None, description="batch sizes to capture decode graphs for (default: the backend's)"
    )
    # One step in flight: while the device runs step N, the host schedules step N+1 (the tokens
    # N is sampling stand as placeholders) and afterwards turns N's tokens into outputs while
    # N+1 runs. Greedy output is unchanged.
    async_scheduling: bool = Field(
        False,
        description="schedule step N+1 while step N runs, and launch it before N's outputs are "
        "built (as vLLM's async scheduling; not with speculative decoding or tensor parallelism)",
    )
    tokenizer: str | None = Field(None, description="tokenizer directory (default: the model directory)")
    backend_options: dict[str, object] = Field(
        default_factory=dict,
        description="options for the named backend's constructor, e.g. interpret=true for cuda",
    )
    # Each rank holds 1/N of the heads, the MLP and the vocabulary; ranks are worker processes
    # driven by this engine's scheduler (`xllm.engine.tp`).
    tensor_parallel_size: int = Field(
        1,
        ge=1,
        description="shard the model over this many worker processes, one per device (on the CPU "
        "each gets cores/N threads); must divide the attention and KV heads",
    )
    # A failing model step fails only its own requests; this many failures in a row (or one that
    # the backend calls fatal) mean the device is broken, and the engine stops (EngineDeadError).
    max_consecutive_step_failures: int = Field(
        3,
        ge=1,
        description="stop the engine (and exit `xllm serve` with status 1) after this many failed "
        "model steps in a row; an error the backend calls fatal stops it at once",
    )
    # Speculative decoding by n-gram prompt lookup (no draft model): greedy requests verify up
    # to this many guessed tokens per step in one forward pass; the output is unchanged.
    num_speculative_tokens: int = Field(
        0,
        ge=0,
        le=32,
        description="speculative decoding: draft up to this many tokens per step by n-gram prompt "
        "lookup (or speculative_model) and verify them in one pass (greedy requests; 0: off)",
    )
    speculative_ngram_max: int = Field(
        3, ge=1, le=16, description="longest n-gram the prompt lookup matches (it tries down to 1)"
    )
    # A draft model instead of the n-gram lookup: a smaller checkpoint with the target's
    # vocabulary guesses greedily, with its own KV cache (`xllm.engine.draft_model`).
    speculative_model: str | None = Field(
        None,
        description="speculative decoding: checkpoint directory of a draft model (same vocabulary as "
        "the target) that guesses the num_speculative_tokens tokens instead of n-gram lookup; its "
        "KV cache has as many blocks as the target's and comes out of the same budget",
    )

    @field_validator("backend", mode="before")
    @classmethod
    def _check_backend(cls, value: object) -> object:
        if value is None or isinstance(value, str):
            return value
        from xllm.hal.backend import Backend  # an instance exists, so torch is loaded already

        if not isinstance(value, Backend):
            raise ValueError(f"backend must be a name or a xllm.hal.Backend, got {type(value).__name__}")
        return value

    @field_serializer("backend", when_used="json")
    def _backend_name(self, value: object) -> str | None:
        # JSON describes the backend by name; the instance itself stays in python-mode dumps.
        return value if value is None or isinstance(value, str) else value.name  # type: ignore[attr-defined]

    @field_validator("kv_cache_memory", mode="before")
    @classmethod
    def _parse_kv_bytes(cls, value: object) -> object:
        return None if value is None else parse_bytes(value)  # type: ignore[arg-type]

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, value: str) -> str:
        return value if value == "auto" else canonical_dtype_name(value)

    @model_validator(mode="after")
    def _backend_options_need_a_name(self) -> EngineConfig:
        if self.backend_options and not (self.backend is None or isinstance(self.backend, str)):
            raise ValueError(
                "backend_options apply to a backend opened by name; a Backend instance is already "
                "built, so pass its options to its constructor instead"
            )
        return self

    @model_validator(mode="after")
    def _draft_model_needs_tokens(self) -> EngineConfig:
        if self.speculative_model is None:
            return self
        if self.num_speculative_tokens < 1:
            raise ValueError(
                "speculative_model needs num_speculative_tokens >= 1 (how many tokens the draft "
                "model guesses per step)"
            )
        if self.tensor_parallel_size > 1:
            raise ValueError(
                "speculative_model is not supported with tensor_parallel_size > 1; use n-gram "
                "speculation (drop speculative_model) or tensor_parallel_size 1"
            )
        return self

    @model_validator(mode="after")
    def _async_scheduling_alone(self) -> EngineConfig:
        # A speculative step's token count is known only after the step before it has run, and a
        # tensor-parallel step is driven through worker processes that run one step at a time.
        if self.async_scheduling and self.num_speculative_tokens:
            raise ValueError("async_scheduling cannot be combined with speculative decoding")
        if self.async_scheduling and self.tensor_parallel_size > 1:
            raise ValueError("async_scheduling is not supported with tensor_parallel_size > 1")
        return self

    @model_validator(mode="after")
    def _chunked_prefill_fits(self) -> EngineConfig:
        if (
            not self.enable_chunked_prefill
            and self.max_model_len is not None
            and self.max_num_batched_tokens < self.max_model_len
        ):
            raise ValueError(chunked_prefill_error(self.max_num_batched_tokens, self.max_model_len))
        return self


def chunked_prefill_error(max_num_batched_tokens: int, max_model_len: int) -> str:
    """Without chunked prefill a prompt runs in one step, so one of max_model_len tokens must fit."""
    return (
        f"max_num_batched_tokens ({max_num_batched_tokens}) is smaller than max_model_len "
        f"({max_model_len}) with chunked prefill disabled, so a long prompt could never be "
        "scheduled; raise max_num_batched_tokens, lower max_model_len, or enable chunked prefill"
    )
