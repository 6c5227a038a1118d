"""A tensor-parallel worker process: one rank's model shard, KV cache and `ModelRunner`.

It serves the driver's commands over its pipe, one at a time, and answers each with
``("ok", value)`` or ``("error", text)``:

* ``plan_kv_cache (max_len)``: the rank's `KVCachePlan` (the driver takes the smallest);
* ``start (num_physical_blocks, max_model_len, eos_token_ids)``: allocates the rank's KV cache (its
  own heads only) and builds the runner;
* ``step (inputs, scheduled views)``: one model step; rank 0 samples and answers the `StepResult`,
  the others answer None;
* ``shutdown``.

The ranks exchange activations only through the backend's `Communicator`. A worker whose pipe
closes (the driver died) exits.
"""

from __future__ import annotations

import traceback
from multiprocessing.connection import Connection
from typing import Any

from xllm.engine.tp.messages import WorkerSpec


def worker_main(spec: WorkerSpec, conn: Connection) -> None:
    """Process entry point (spawned, so it imports torch and the backend itself)."""
    import torch

    torch.set_num_threads(spec.num_threads)
    try:
        state = _WorkerState(spec)
    except BaseException as exc:  # the driver reports it: a worker's stderr may not be seen
        _send(
            conn, ("error", f"rank {spec.rank} failed to start: {_describe(exc)}\n{traceback.format_exc()}")
        )
        return
    _send(conn, ("ok", None))
    try:
        while True:
            try:
                command, payload = conn.recv()
            except (EOFError, OSError):
                return
            if command == "shutdown":
                _send(conn, ("ok", None))
                return
            try:
                reply: tuple[str, Any] = ("ok", state.handle(command, payload))
            except Exception as exc:
                reply = ("error", f"rank {spec.rank}: {_describe(exc)}\n{traceback.format_exc()}")
            if not _send(conn, reply):
                return
    finally:
        state.close()


def _send(conn: Connection, message: tuple[str, Any]) -> bool:
    try:
        conn.send(message)
        return True
    except (BrokenPipeError, EOFError, OSError):
        return False


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


class _WorkerState:
    def __init__(self, spec: WorkerSpec) -> None:
        from xllm.hal import get_backend
        from xllm.models.parallel import load_model_shard

        self.spec = spec
        self.backend = get_backend(spec.backend, **spec.config.backend_options)
        self.comm = self.backend.create_communicator(spec.rank, spec.world_size, spec.init_method)
        self.model = load_model_shard(
            spec.model_path,
            self.backend,
            self.comm,
            dtype=spec.dtype,
            device_index=spec.rank,
            quantization=spec.config.quantization,
        )
        self.runner = None

    def handle(self, command: str, payload: Any) -> Any:
        if command == "plan_kv_cache":
            from xllm.engine.kv_cache_sizing import plan_kv_cache

            return plan_kv_cache(self.backend, self.model, self.spec.config, payload)
        if command == "start":
            return self._start(*payload)
        if command == "step":
            inputs, scheduled = payload
            return self.runner.execute_prepared(inputs, scheduled, sample=self.spec.rank == 0)
        raise ValueError(f"unknown command {command!r}")

    def _start(self, num_physical_blocks: int, max_model_len: int, eos_token_ids: set[int]) -> None:
        from xllm.engine.model_runner import ModelRunner
        from xllm.models import load_tokenizer

        spec, cfg = self.spec, self.model.config  # the shard's config: this rank's KV heads
        kv_caches = self.backend.allocate_kv_cache(
            cfg.num_layers,
            num_physical_blocks,
            spec.config.block_size,
            cfg.num_kv_heads,
            cfg.head_dim,
            self.model.dtype,
            device_index=spec.rank,
        )
        # Only rank 0 samples, so only it decodes logprob tokens.
        tokenizer = load_tokenizer(spec.config.tokenizer or spec.model_path) if spec.rank == 0 else None
        self.runner = ModelRunner(
            self.backend,
            self.model,
            kv_caches,
            spec.config.block_size,
            max_model_len,
            spec.config.max_num_seqs,
            tokenizer=tokenizer,
            use_graphs=spec.config.use_graphs,
            capture_sizes=spec.config.capture_sizes,
            eos_token_ids=eos_token_ids,
            device_index=spec.rank,
        )

    def close(self) -> None:
        try:
            self.comm.close()
        except Exception:
            pass  # a peer already gone; the process is exiting anyway
