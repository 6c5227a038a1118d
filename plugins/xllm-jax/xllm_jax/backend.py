"""`JaxBackend`: the HAL contract on JAX's CPU device, ops in jax.numpy under jax.jit.

Tensors stay torch CPU tensors above the HAL; each op hands its inputs to a jitted JAX kernel
through DLPack and hands the result back the same way (`bridge`). What is not JAX, and why:

* the KV cache is a torch tensor written in place (`cache`: JAX arrays are immutable);
* graphs replay eagerly (`_create_graph_runner`: the step is torch code JAX cannot trace);
* streams and events are the HAL's synchronous ones (every op waits for its result);
* collectives are gloo on the torch tensors (`comm`); there is no xTensor (no VMM API in JAX).

This module imports neither jax nor the kernels at import time: `xllm backends` imports every
registered backend's module to probe it, on machines without jax too.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from typing import ClassVar

import torch
from xllm.hal.backend import FLOAT_DTYPES, Backend, Capabilities
from xllm.hal.comm import Communicator
from xllm.hal.graphs import EagerGraphRunner, GraphInput, GraphRunner
from xllm.hal.memory import MemInfo
from xllm.hal.metadata import AttentionMetadata, SampleOutput, SamplingMetadata
from xllm.hal.streams import Event, Stream, SyncEvent, SyncStreams


def probe_reason() -> str | None:
    """None when jax and jaxlib are importable; found by spec so probing stays cheap."""
    for module in ("jax", "jaxlib"):
        if importlib.util.find_spec(module) is None:
            return f"{module} is not installed (pip install jax)"
    return None


class JaxBackend(Backend):
    name: ClassVar[str] = "jax"
    device_type: ClassVar[str] = "cpu"  # its tensors are torch CPU tensors; JAX borrows them
    CAPABILITIES: ClassVar[Capabilities] = Capabilities(
        dtypes=FLOAT_DTYPES,
        # XLA's CPU backend computes bfloat16/float16 by converting through float32.
        native_dtypes=(torch.float32,),
        shares_host_memory=True,
        graph_capture=False,  # replay re-runs the step; each op reuses its bucket's executable
        virtual_memory=False,
        collective_backend="gloo",
        kv_cache_layout="NHD",
        notes=(
            "jax.numpy kernels under jax.jit on JAX's CPU device; torch tensors cross by DLPack",
            "KV cache is a torch tensor written in place; graphs replay eagerly",
        ),
    )

    def __init__(self) -> None:
        # Imported here, not at module import: see the module docstring.
        import jax

        from xllm_jax import attention, bridge, cache, kernels, sampling

        if not jax.devices("cpu"):
            raise RuntimeError("JAX reports no CPU device")
        self._attn = attention
        self._bridge = bridge
        self._cache = cache
        self._kernels = kernels
        self._sampling = sampling
        self._streams = SyncStreams()

    # ------------------------------------------------------------------ identity

    @classmethod
    def probe(cls, **options: object) -> str | None:
        if options:
            return f"backend 'jax' takes no options, got {sorted(options)}"
        return probe_reason()

    @classmethod
    def device_count(cls) -> int:
        return 1 if probe_reason() is None else 0

    # ------------------------------------------------------------------ ops

    def _rms_norm(
        self, x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        b, k = self._bridge, self._kernels
        with b.x64():
            rows, shape = b.rows_2d(x)
            w = b.to_jax(weight)
            if residual is None:
                return b.unrows(b.to_torch(k.rms_norm(b.to_jax(rows), w, eps)), shape)
            res_rows, _ = b.rows_2d(residual)
            normed, hidden = k.add_rms_norm(b.to_jax(rows), b.to_jax(res_rows), w, eps)
            return b.unrows(b.to_torch(normed), shape), b.unrows(b.to_torch(hidden), shape)

    def _rotary_embedding(
        self,
        positions: torch.Tensor,
        q: torch.Tensor,
        k: torch.Tensor,
        cos_sin_cache: torch.Tensor,
        neox_style: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        b = self._bridge
        t = positions.shape[0]
        rows = b.bucket(t)
        with b.x64():
            q_out, k_out = self._kernels.rotary_embedding(
                b.to_jax(b.pad_rows(positions, rows)),
                b.to_jax(b.pad_rows(q, rows)),
                b.to_jax(b.pad_rows(k, rows)),
                b.to_jax(cos_sin_cache),
                neox_style,
            )
            # New tensors, not writes into q and k: the contract allows either, and the callers
            # use the returned pair.
            return b.to_torch(q_out)[:t], b.to_torch(k_out)[:t]

    def _silu_and_mul(self, x: torch.Tensor) -> torch.Tensor:
        b = self._bridge
        with b.x64():
            rows, shape = b.rows_2d(x)
            return b.unrows(b.to_torch(self._kernels.silu_and_mul(b.to_jax(rows))), shape)

    def _gelu_and_mul(self, x: torch.Tensor, approximate: str) -> torch.Tensor:
        b = self._bridge
        with b.x64():
            rows, shape = b.rows_2d(x)
            return b.unrows(b.to_torch(self._kernels.gelu_and_mul(b.to_jax(rows), approximate)), shape)

    def _linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        b = self._bridge
        with b.x64():
            rows, shape = b.rows_2d(x)
            out = self._kernels.linear(
                b.to_jax(rows), b.to_jax(weight), None if bias is None else b.to_jax(bias)
            )
            return b.unrows(b.to_torch(out), shape)

    def _linear_int8(
        self,
        x: torch.Tensor,
        qweight: torch.Tensor,
        scales: torch.Tensor,
        bias: torch.Tensor | None,
        group_size: int,
    ) -> torch.Tensor:
        b = self._bridge
        with b.x64():
            rows, shape = b.rows_2d(x)
            out = self._kernels.linear_int8(
                b.to_jax(rows),
                b.to_jax(qweight),
                b.to_jax(scales),
                None if bias is None else b.to_jax(bias),
                group_size,
            )
            return b.unrows(b.to_torch(out), shape)

    def _reshape_and_cache(
        self,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        slot_mapping: torch.Tensor,
    ) -> None:
        with self._bridge.x64():
            self._cache.reshape_and_cache(k, v, k_cache, v_cache, slot_mapping)

    def _attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_cache: torch.Tensor,
        v_cache: torch.Tensor,
        metadata: AttentionMetadata,
    ) -> torch.Tensor:
        b, attn = self._bridge, self._attn
        md = metadata
        num_tokens = q.shape[0]
        if md.num_seqs == 0 or num_tokens == 0:
            return torch.zeros_like(q)
        # Host copies (or one read of the tensors, kept for the step's other layers): the rows
        # and their bucket sizes are decided on the host, as jit needs static shapes.
        calls = attn.plan_rows(md.host_query_start_loc(), md.host_seq_lens(), q.shape[1])
        tables = md.block_tables.detach().to("cpu").numpy()
        block_size = k_cache.shape[1]
        with b.x64():
            import jax.numpy as jnp

            q_j = b.to_jax(b.pad_rows(q, b.bucket(num_tokens)))
            kc, vc = b.to_jax(k_cache), b.to_jax(v_cache)
            out = jnp.zeros(q_j.shape, q_j.dtype)
            for rows in calls:
                arrays, q_rows, _ = attn.row_arrays(rows, tables, block_size)
                out = attn.attend_rows(
                    out,
                    q_j,
                    kc,
                    vc,
                    *(b.host_to_jax(arrays[name]) for name in ("tables", "start", "q_len", "ctx_len")),
                    q_rows=q_rows,
                    scale=float(md.scale),
                    window=md.sliding_window,
                )
            return b.to_torch(out)[:num_tokens]

    def _processed_logits(self, logits: torch.Tensor, sampling: SamplingMetadata) -> torch.Tensor:
        with self._bridge.x64():
            return self._sampling.processed_logits(logits, sampling)

    def _sample(self, logits: torch.Tensor, sampling: SamplingMetadata) -> SampleOutput:
        with self._bridge.x64():
            return self._sampling.sample(logits, sampling)

    # ------------------------------------------------------------------ memory

    def _mem_info(self, device_index: int) -> MemInfo:
        from xllm.hal.memory import host_mem_info

        return host_mem_info()

    # ------------------------------------------------------------------ graphs

    def _create_graph_runner(
        self,
        fn: Callable[..., torch.Tensor],
        inputs: dict[str, GraphInput],
        capture_sizes: Sequence[int] | None,
        max_batch_size: int | None,
        device_index: int,
    ) -> GraphRunner:
        """Eager replay, because the step cannot become one JAX program.

        The function a GraphRunner captures is the engine's torch step (embedding lookup, views,
        the model's Python) calling this backend's ops; jax.jit traces JAX values only, so it
        cannot trace through torch code, and there is no JAX graph to record. What does hold per
        bucket is what a graph would buy on this device: every op inside the step sees the
        bucket's fixed shapes, so capturing a bucket (running the step once) compiles each op's
        XLA executable for it, and replay dispatches those executables without compiling. The
        HAL's EagerGraphRunner does exactly that (static buffers, pad rows, re-run on replay).
        """
        return EagerGraphRunner(fn, inputs, self.device(device_index), capture_sizes, max_batch_size)

    # ------------------------------------------------------------------ streams

    def create_stream(self, device_index: int = 0) -> Stream:
        return self._streams.create()

    def create_event(self, enable_timing: bool = False) -> Event:
        return SyncEvent(enable_timing)

    def current_stream(self, device_index: int = 0) -> Stream:
        return self._streams.current()

    def synchronize(self, device_index: int = 0) -> None:
        # JAX dispatches asynchronously, but every op here waits for its result before handing
        # it to torch (`bridge.to_torch`), so nothing is left in flight between calls.
        pass

    # ------------------------------------------------------------------ comm

    def _create_communicator(self, rank: int, world_size: int, init_method: str) -> Communicator:
        from xllm.hal.gloo import GlooCommunicator

        return GlooCommunicator(rank, world_size, init_method)
